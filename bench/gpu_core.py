"""The GPU core check: what the student step costs on one GPU, with the project's own code and nothing
but torch, transformers and small pure-Python wheels (no Ray, no vLLM), from source.

    PYTHONPATH=src python3 bench/gpu_core.py [--tiny] [--reps 3] [--out FILE]

First it asserts that every fast path equals its reference on this device, values and gradients:
the loss fused with the student's head (`losses.HeadInputs`, fp32 and bf16 matmuls) against the
float64 loss of whole logits; the relation loss's analytic gradient (fp32 and bf16) against float64
autograd; compiled BitNet quantizers against eager ones (ternary and mid-warm-up);
Liger's fused linear distillation loss (where `liger_kernel` imports) against ours. Then, on random
weights of the real shapes (SmolLM2-135M, Qwen3-1.7B; `--tiny`: a 2-layer model for a CPU test):
tokens/s and peak memory of one optimizer step for a plain model with CE (the fine-tuning limit), the
BitNet student with CE, + KD (hidden-state teacher), + the attention relations, CE compiled
(quantizers and loss), all three compiled (what experiment=gpu runs), and CE + KD with activation
checkpointing; and the loss alone (16,384 tokens at 49k and
152k vocabularies): ours against naive dense logits and Liger. Under 5 minutes on an H100/H200.
How to run it on an offline GPU machine (the wheels to bring): bench/README.md, "The GPU core check".
"""

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch._dynamo

from distillation.losses import HeadInputs, HiddenTargets, OutputHead, logit_losses
from distillation.student import convert_to_bitnet, set_compile, set_quant_mix
from distillation.teachers.schema import PREFIX
from distillation.training.plan import loss_weights
from distillation.training.step import micro_step


def _shapes(tiny: bool) -> dict:
    """name -> (config, batch, seq). Real architectures' shapes, random weights."""
    from transformers import LlamaConfig, Qwen3Config

    if tiny:
        return {"tiny llama": (LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), 2, 64)}
    return {"SmolLM2-135M": (LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                         rope_theta=100000.0), 16, 2048),
            "Qwen3-1.7B": (Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                       tie_word_embeddings=True), 8, 2048)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, reps: int, warm: int = 1):
    """(median seconds, [min, max], peak GiB or None) of `fn` over `reps` after `warm` calls."""
    for _ in range(warm):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(seconds), [min(seconds), max(seconds)], peak


# -- the fast paths against their references ---------------------------------------------------------
def _close(name, got, want, rtol):
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)).item()
    assert err < rtol, f"{name}: relative error {err:.2e} (allowed {rtol:.0e})"
    return err


def check_fused_loss(device, vocab=1000, width=64, tokens=300) -> dict:
    """HeadInputs (fp32 and bf16 matmuls) against the float64 CE + KL of whole logits, hidden teacher."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(tokens, width, generator=g), torch.randn(vocab + 24, width, generator=g) * 0.3
    t_hidden, t_weight = torch.randn(tokens, width, generator=g), torch.randn(vocab, width, generator=g) * 0.3
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::7] = -100
    ref = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    s_lp = torch.log_softmax(ref[0] @ ref[1][:vocab].T, -1)
    t_lp = torch.log_softmax(t_hidden.double() @ t_weight.double().T, -1)
    mask = (labels != -100).double()
    ce = -(s_lp.gather(-1, labels.clamp(min=0)[:, None])[:, 0] * mask).sum() / mask.sum()
    kl = ((t_lp.exp() * (t_lp - s_lp)).sum(-1) * mask).sum() / mask.sum()
    want = ce + 10 * kl
    want_grads = torch.autograd.grad(want, ref)
    errors = {}
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        leaves = [hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()]
        head = OutputHead(t_weight).to(device, dtype)
        total = logit_losses(HeadInputs(leaves[0], leaves[1], None, vocab, dtype), labels.to(device),
                             HiddenTargets(t_hidden.to(device), head), 1.0, True, 1.0, 10.0, chunk_tokens=128)[0]
        grads = torch.autograd.grad(total, leaves)
        name = f"fused loss ({str(dtype)[6:]})"
        errors[name] = max(_close(name + " value", total.reshape(1), want.reshape(1), rtol),
                           *(_close(f"{name} grad {i}", a, b, rtol) for i, (a, b) in enumerate(zip(grads, want_grads))))
    return errors


def check_relations(device, width=64, length=96) -> dict:
    """The relation loss's analytic gradient (fp32 and bf16 matmuls) against float64 autograd."""
    from distillation.losses import attention_relation_loss

    g = torch.Generator().manual_seed(3)
    teacher = {k: torch.randn(2, length, width, generator=g) for k in "qkv"}
    student = {k: teacher[k] + 0.5 * torch.randn(2, length, width, generator=g) for k in "qkv"}

    def reference(states):
        total = 0.0
        for key in "qkv":
            lps = []
            for x in (teacher[key].double(), states[key]):
                x = torch.nn.functional.normalize(x.view(2, length, 8, width // 8).transpose(1, 2), dim=-1)
                lps.append(torch.log_softmax(x @ x.transpose(-1, -2), -1))
            total = total + (lps[0].exp() * (lps[0] - lps[1])).sum() / (2 * length * 8 * 8)
        return total
    ref_leaves = {k: v.double().requires_grad_() for k, v in student.items()}
    want = reference(ref_leaves)
    want_grads = torch.autograd.grad(want, list(ref_leaves.values()))
    errors = {}
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        leaves = {k: v.to(device).requires_grad_() for k, v in student.items()}
        got = attention_relation_loss({k: v.to(device) for k, v in teacher.items()}, leaves, 8, dtype=dtype)
        grads = torch.autograd.grad(got, list(leaves.values()))
        name = f"relations ({str(dtype)[6:]})"
        errors[name] = max(_close(name + " value", got.reshape(1), want.reshape(1), rtol),
                           *(_close(f"{name} grad", a, b, rtol) for a, b in zip(grads, want_grads)))
    return errors


def check_compiled_quantizers(device, width=256) -> dict:
    """A converted layer's output and gradients with compiled quantizers equal the eager ones, at
    mix 1 (ternary) and 0.5 (mid-warm-up)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = convert_to_bitnet(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=width, intermediate_size=width,
                                                               num_hidden_layers=1, num_attention_heads=4)))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(8, width, device=device)
    errors = {}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for mix in (1.0, 0.5):
        set_quant_mix(model, mix)
        outs = []
        for compiled in (False, True):
            set_compile(compiled)
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.square().sum().backward()
            outs.append((y.detach(), xi.grad, layer.weight.grad.clone()))
        set_compile(False)
        name = f"compiled quantizers (mix {mix})"
        errors[name] = max(_close(f"{name} {what}", a, b, 1e-5) for what, a, b in zip(("out", "dx", "dw"), *outs))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, "the quantizers were not compiled"
    return errors


def _liger_loss():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    # beta 0: KL(teacher || student), ours; CE weight 1 and KL weight lambda, both means over labelled tokens
    return LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=10.0, beta=0.0, temperature=1.0,
                                   compiled=True)


def check_liger(device, vocab=1000, width=64, tokens=256) -> dict:
    """Liger's fused linear distillation loss equals ours where both apply (dense teacher from hidden
    states, tau 1, no tau^2 difference at tau 1)."""
    liger = _liger_loss()
    if liger is None:
        return {}
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(tokens, width, generator=g).to(device), (torch.randn(vocab, width, generator=g) * 0.3).to(device)
    t_hidden, t_weight = torch.randn(tokens, width, generator=g).to(device), (torch.randn(vocab, width, generator=g) * 0.3).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    results = []
    for fn in ("ours", "liger"):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        if fn == "ours":
            total = logit_losses(HeadInputs(leaves[0], leaves[1], None, vocab), labels,
                                 HiddenTargets(t_hidden, OutputHead(t_weight)), 1.0, True, 1.0, 10.0)[0]
        else:
            total = liger(leaves[0], leaves[1], t_hidden, t_weight, labels)
        results.append((total.reshape(1), *torch.autograd.grad(total, leaves)))
    return {"liger = ours": max(_close(f"liger {w}", a, b, 1e-4) for w, a, b in zip(("value", "dh", "dw"), *results))}


# -- the step ---------------------------------------------------------------------------------------
ARMS = ("plain, CE", "BitNet, CE", "BitNet, CE + KD (hidden)", "+ attention relations", "BitNet CE, compiled (quantizers and loss)",
        "+ attention relations, compiled (experiment=gpu)", "BitNet, CE + KD, activation checkpointing")


def _batch(config, batch, seq, device, arm):
    g = torch.Generator().manual_seed(0)
    columns = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device),
               "length": torch.full((batch,), seq, device=device)}
    if "KD" in arm or "relations" in arm:
        columns[PREFIX + "hidden"] = torch.randn(batch, seq, config.hidden_size, generator=g).to(device, torch.bfloat16)
    if "relations" in arm:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for key, heads in (("q", config.num_attention_heads), ("k", config.num_key_value_heads),
                           ("v", config.num_key_value_heads)):
            columns[PREFIX + key] = torch.randn(batch, seq, heads * head_dim, generator=g).to(device, torch.bfloat16)
    return columns


def step_arm(name, config, batch, seq, device, arm, reps, checkpointing) -> dict:
    from transformers import AutoModelForCausalLM

    from distillation.models import capture_qkv

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
        if arm != "plain, CE":
            convert_to_bitnet(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    set_compile("compiled" in arm)
    kd, attention = "KD" in arm or "relations" in arm, "relations" in arm
    weights = loss_weights(logits_weight=10.0 if kd else 0.0, attention_weight=1e5 if attention else 0.0)
    head = OutputHead(torch.randn(config.vocab_size, config.hidden_size, device=device) * 0.02).to(
        device, torch.bfloat16 if device.type == "cuda" else None) if kd else None
    columns = _batch(config, batch, seq, device, arm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext

    def step():
        if attention:
            with capture_qkv(model, -2) as states:
                micro_step(model, columns, weights, config.vocab_size, head, states, autocast)
        else:
            micro_step(model, columns, weights, config.vocab_size, head, None, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in model.parameters())
    try:
        seconds, spread, peak = _timed(step, device, reps, warm=2 if "compiled" in arm else 1)
    except torch.OutOfMemoryError:
        seconds = None
    finally:
        set_compile(False)
        model = optimizer = None  # freed before the next arm  # noqa: F841
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if seconds is None:
        return {"model": name, "arm": arm, "oom": True}
    tokens = batch * seq
    return {"model": name, "arm": arm, "tokens_per_s": tokens / seconds, "seconds": seconds, "spread": spread,
            "peak_gib": peak, "tflops": 6 * params * tokens / seconds / 1e12, "activation_checkpointing": checkpointing}


# -- the loss alone ---------------------------------------------------------------------------------
def loss_arm(vocab, tokens, width, device, variant, reps) -> dict:
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(tokens, width, generator=g).to(device)
    weight = (torch.randn(vocab, width, generator=g) * 0.02).to(device)
    t_hidden = torch.randn(tokens, width, generator=g).to(device, torch.bfloat16)
    t_weight = (torch.randn(vocab, width, generator=g) * 0.02).to(device)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_head = OutputHead(t_weight).to(device, dtype)
    liger = _liger_loss() if variant == "Liger fused" else None
    if variant == "Liger fused" and liger is None:
        return {"vocab": vocab, "variant": variant, "skipped": "liger_kernel not importable"}
    h_in, w_in = hidden.to(dtype), weight.to(dtype)

    def run():
        leaves = [h_in.detach().requires_grad_(), w_in.detach().requires_grad_()]
        if variant.startswith("ours"):
            total = logit_losses(HeadInputs(leaves[0], leaves[1], None, vocab, dtype), labels,
                                 HiddenTargets(t_hidden, t_head), 1.0, True, 1.0, 10.0)[0]
        elif variant == "naive dense":
            s_lp = torch.log_softmax((leaves[0] @ leaves[1].T).float(), -1)
            t_lp = torch.log_softmax(t_head(t_hidden), -1)
            total = torch.nn.functional.nll_loss(s_lp, labels) + 10.0 * (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean()
        else:
            total = liger(leaves[0], leaves[1], t_hidden.to(dtype), t_weight.to(dtype), labels)
        total.backward()

    set_compile("compiled" in variant)  # our chunk functions compile on a GPU only (losses/logits.py)
    try:
        seconds, spread, peak = _timed(run, device, reps, warm=2)
    except torch.OutOfMemoryError:
        return {"vocab": vocab, "variant": variant, "oom": True}
    finally:
        set_compile(False)
    return {"vocab": vocab, "variant": variant, "seconds": seconds, "spread": spread, "peak_gib": peak}


def table(result: dict) -> str:
    lines = ["checks passed (largest relative error): " + ", ".join(f"{k} {v:.1e}" for k, v in result["checks"].items()), "",
             "| model, tokens per step | arm | tokens/s | x plain | TFLOP/s (6N) | peak GiB |", "|---|---|---|---|---|---|"]
    plain = {r["model"]: r.get("tokens_per_s") for r in result["steps"] if r["arm"] == "plain, CE"}
    for r in result["steps"]:
        if r.get("oom"):
            lines.append(f"| {r['model']} | {r['arm']} | OOM | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / plain[r['model']]:.2f}x" if plain.get(r["model"]) else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['model']}{' (act. ckpt)' if r['activation_checkpointing'] else ''} | {r['arm']} | "
                     f"{r['tokens_per_s']:,.0f} | {ratio} | {r['tflops']:.1f} | {peak} |")
    lines += ["", f"| loss alone, {result['loss_tokens']} tokens: vocabulary | variant | ms (median [min, max]) | peak GiB |",
              "|---|---|---|---|"]
    for r in result["losses"]:
        if "seconds" not in r:
            lines.append(f"| {r['vocab']:,} | {r['variant']} | {r.get('skipped', 'OOM')} | |")
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['vocab']:,} | {r['variant']} | {r['seconds'] * 1e3:.0f} [{r['spread'][0] * 1e3:.0f}, "
                     f"{r['spread'][1] * 1e3:.0f}] | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a test on CPU)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", help="write the result here as JSON")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.time()
    checks = {**check_fused_loss(device), **check_relations(device), **check_compiled_quantizers(device),
              **check_liger(device)}
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if device.type == "cuda" else 0
    steps = []
    for name, (config, batch, seq) in _shapes(args.tiny).items():
        checkpointing = config.hidden_size >= 2048 and memory < 120  # the 1.7B step fits an 80 GB card only so
        for arm in ARMS:
            steps.append(step_arm(name, config, batch, seq, device, arm, args.reps,
                                  checkpointing or "checkpointing" in arm))
            print(json.dumps(steps[-1]), file=sys.stderr, flush=True)
    loss_tokens = 512 if args.tiny else 16384
    losses = [loss_arm(vocab, loss_tokens, 64 if args.tiny else 576, device, variant, args.reps)
              for vocab in ((1000,) if args.tiny else (49152, 151936))
              for variant in ("ours (fused head)", "ours (fused head), compiled", "naive dense", "Liger fused")]
    versions = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "versions": versions,
              "checks": checks, "steps": steps, "losses": losses, "loss_tokens": loss_tokens,
              "wall_s": time.time() - started}
    result["table"] = table(result)
    print(result["table"])
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
