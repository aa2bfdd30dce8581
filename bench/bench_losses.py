"""Peak memory and time of the combined BitDistill loss (forward + backward), the student's output
head included: naive vs chunked vs fused.

Every version computes the same L = CE + lambda * L_LD * tau^2 + gamma * L_AD on the same inputs
(the student's final hidden states [batch, seq, 576] fp32 and its output head [vocab, 576], sparse
top-k teacher targets, Q/K/V of one layer). The naive one builds every (tokens x vocab) fp32 tensor
at once; the chunked one takes the whole logits from the head and chunks the loss (the step before
issue 26); the fused one (`losses.HeadInputs`, what training runs) applies the head chunk by chunk,
so no (tokens x vocab) tensor exists. Each repetition runs in a fresh process
so peak memory is that run's own: on CPU the rise of the process's peak RSS over its level after
the inputs exist, on GPU `torch.cuda.max_memory_allocated` above the inputs.

    python bench/bench_losses.py [--tokens 8192] [--vocab 49152] [--reps 3] [--device cpu|cuda]
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from distillation.losses.logits import DEFAULT_CHUNK_TOKENS
from distillation.training.plan import loss_weights

VARIANTS = ("naive", "chunked", "fused")
WIDTH = 576  # SmolLM2-135M's hidden size


def _inputs(tokens, vocab, seq, k, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    batch = tokens // seq
    hidden = torch.randn(batch, seq, WIDTH, generator=g).to(device).requires_grad_()
    head = torch.randn(vocab, WIDTH, generator=g).mul_(0.1).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels[:, -1] = -100
    ids = torch.empty(batch, seq, k, dtype=torch.long)
    for b in range(batch):  # row by row, so no (tokens x vocab) teacher tensor raises the peak first
        ids[b] = torch.randn(seq, vocab, generator=g).topk(k, -1).indices
    logprobs = torch.log_softmax(torch.randn(batch, seq, k + 1, generator=g), -1)

    def qkv(width):
        return {key: torch.randn(batch, seq, width, generator=g).to(device) for key in "qkv"}

    return (hidden, head, labels, ids.to(device), logprobs[..., :k].to(device), logprobs[..., k].exp().to(device),
            qkv(576), qkv(576))


def _naive_relations(teacher, student, heads):
    """L_AD by autograd on whole [B, heads, T, T] tensors (reference normalisation, no mask)."""
    total = 0.0
    for key in "qkv":
        lps = []
        for states in (teacher[key], student[key]):
            b, n, width = states.shape
            x = torch.nn.functional.normalize(states.view(b, n, heads, width // heads).transpose(1, 2), dim=-1)
            lps.append(torch.log_softmax(x @ x.transpose(-1, -2), -1))
        total = total + (lps[0].exp() * (lps[0] - lps[1])).sum() / (b * n * heads * heads)
    return total


def _run_one(variant, tokens, vocab, device, chunk_tokens):
    from distillation.losses import (
        HeadInputs,
        SparseTargets,
        bitdistill_loss,
        cross_entropy,
        logits_kl,
    )

    hidden, head, labels, ids, logprobs, tail, t_qkv, s_qkv = _inputs(tokens, vocab, 256, 32, device)
    w = loss_weights(chunk_tokens=chunk_tokens)  # the defaults
    targets = SparseTargets(ids=ids, logprobs=logprobs, tail_mass=tail, temperature=w.temperature)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if variant == "fused":
        total = bitdistill_loss(HeadInputs(hidden, head, None, vocab), labels, w, targets, t_qkv, s_qkv).total
    elif variant == "chunked":
        total = bitdistill_loss(hidden @ head.T, labels, w, targets, t_qkv, s_qkv).total
    else:
        logits = hidden @ head.T
        total = (w.ce_weight * cross_entropy(logits, labels) + w.logits_weight * logits_kl(logits, targets, labels, w.temperature)
                 + w.attention_weight * _naive_relations(t_qkv, s_qkv, w.split_heads))
    total.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak, "loss": total.item(),
            "grad_sum": hidden.grad.double().abs().sum().item()}


def _spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_run_one(args.child, args.tokens, args.vocab, args.device, args.chunk_tokens)))
        return
    runs = {v: [] for v in VARIANTS}
    for _ in range(args.reps):
        for variant in VARIANTS:  # interleaved, so drift in the machine hits both alike
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens),
                                  "--vocab", str(args.vocab), "--device", args.device,
                                  "--chunk-tokens", str(args.chunk_tokens)],
                                 capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    naive = runs["naive"]
    same = all(abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]) for v in VARIANTS for a, b in zip(naive, runs[v]))
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"combined loss fwd+bwd with the student's head, {args.tokens} tokens x vocab {args.vocab}, top-32 "
          f"targets + Q/K/V, chunks of {args.chunk_tokens} tokens; {args.reps} reps on {device}; same loss: {same}")
    print(f"{'variant':<8} {'peak MiB (median [min, max])':<30} {'seconds (median [min, max])':<29} "
          "peak / naive's   time / naive's")
    for variant in VARIANTS:
        p = _spread([r["peak_bytes"] / 2**20 for r in runs[variant]])
        s = _spread([r["seconds"] for r in runs[variant]])
        mem = _spread([r["peak_bytes"] / n["peak_bytes"] for n, r in zip(naive, runs[variant])])
        time_ratio = _spread([r["seconds"] / n["seconds"] for n, r in zip(naive, runs[variant])])
        print(f"{variant:<8} {p['median']:8.0f} [{p['min']:.0f}, {p['max']:.0f}]{'':<12} "
              f"{s['median']:6.2f} [{s['min']:.2f}, {s['max']:.2f}]{'':<11} {mem['median']:.2f}x{'':<10} "
              f"{time_ratio['median']:.2f}x [{time_ratio['min']:.2f}, {time_ratio['max']:.2f}]")

if __name__ == "__main__":
    main()
