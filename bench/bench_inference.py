"""The student where users run it: memory and speed of each runtime, and what each export scores.

    python -m bench inference [--parts packed llama quality] [--student DIR] [--reps 5]

- **packed**: the PyTorch runtime. The packed student (`load_student` of a packed export: 2-bit codes
  and the CPU kernel; its embedding, which is also the output head, in fp32 or bf16) against the same
  student as dense ternary matrices in fp32 and bf16 (the packed folder loaded by plain transformers:
  offline AutoBitLinear), and the teacher in fp32 and bf16.
- **llama**: llama.cpp (llama-cpp-python) on the student's GGUF with ternary weights (TQ2_0, TQ1_0)
  against an F16 GGUF of the same student, for SmolLM2-shaped students (576-wide rows: only
  down_proj takes a ternary type, the rest Q8_0) and for a student whose rows are all multiples of 256.
- **quality**: bits/byte of each format against `load_student`'s on held-out documents of each
  default source and on English no run trains on (bench/unseen.py).

Each speed arm runs in a fresh process (2 threads): resident memory once the runs have read every
weight (and how much of it came with the model, above the imported libraries), its peak (VmHWM),
BitLinear weight bytes in memory, prefill tokens/s (one sequence of --prompt tokens) and greedy decode
tokens/s (KV cache, batch 1, --new tokens), median and [min, max] over --reps. Speed does not depend
on what the weights learned, so students are converted from SmolLM2 unless --student names one.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOL = "smollm2-135m-instruct"
WIDE = {"hidden": 768, "intermediate": 2048, "heads": 12, "kv_heads": 4, "layers": 24}  # rows multiple of 256


# -- one arm, in its own process ---------------------------------------------------------------------
def _torch_arm(kind: str, path: str, prompt: int, new: int, reps: int) -> dict:
    import torch

    from distillation.cluster import peak_rss_mb
    from distillation.student import linear_weight_bytes, load_student, set_compile

    torch.set_num_threads(2)
    set_compile(False)
    rss_before = _rss_mb()  # torch and transformers imported, no model yet
    if kind.startswith("packed"):
        model = load_student(path, dtype=torch.bfloat16 if kind.endswith("bf16") else None)
    else:
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if kind.endswith("bf16") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    ids = torch.randint(100, 20000, (1, prompt), generator=torch.Generator().manual_seed(0))
    prefill, decode = [], []
    with torch.inference_mode():
        for rep in range(reps + 1):  # the first is warm-up
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            t1 = time.perf_counter()
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            if rep:
                prefill.append(prompt / (t1 - t0))
                decode.append(new / (t2 - t1))
    sizes = linear_weight_bytes(model)["stored"] if kind.startswith("packed") else _dense_linear_bytes(model)
    held = sum(t.nbytes for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    # after the runs every weight has been read: file-backed (mmapped) weights count only once touched
    return {"rss_mb": _rss_mb(), "rss_base_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
            "linear_mb": sizes / 2**20, "tensors_mb": held / 2**20, "prefill": prefill, "decode": decode}


def _dense_linear_bytes(model) -> int:
    from torch import nn

    return sum(m.weight.nbytes for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")


def _llama_arm(path: str, prompt: int, new: int, reps: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from distillation.cluster import peak_rss_mb

    rss_before = _rss_mb()
    llm = Llama(path, n_ctx=prompt + new + 8, n_threads=2, n_batch=prompt, verbose=False)
    ids = np.random.default_rng(0).integers(100, 20000, prompt).tolist()
    prefill, decode = [], []
    for rep in range(reps + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        # greedy tokens from llama.cpp's sampler; the prompt is matched in its cache (one token re-read)
        for count, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True), start=1):
            if count == new:
                break
        t2 = time.perf_counter()
        if rep:
            prefill.append(prompt / (t1 - t0))
            decode.append(new / (t2 - t1))
    rss_after = _rss_mb()
    llm.close()
    return {"rss_mb": rss_after, "rss_base_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
            "file_mb": Path(path).stat().st_size / 2**20, "prefill": prefill, "decode": decode}


def _rss_mb() -> float:
    """Resident memory now, after handing freed heap back to the system (glibc keeps it otherwise, and
    loading leaves transient buffers that would count against whichever arm allocated more of them)."""
    import ctypes
    import gc

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss / 2**20


def _measure(kind: str, path: Path, args) -> dict:
    done = subprocess.run([sys.executable, __file__, "--arm", kind, str(path), str(args.prompt), str(args.new),
                           str(args.reps)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"arm {kind} {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the models ----------------------------------------------------------------------------------------
def _smol_student(root: Path, layers: int) -> Path:
    from distillation.config.schema import DataConfig
    from distillation.models import load_causal_lm, load_tokenizer, resolve_model
    from distillation.student import convert_to_bitnet, save_student

    if (root / f"smollm2-{layers}").is_dir():  # built by an earlier part of this run
        return root / f"smollm2-{layers}"
    teacher = resolve_model(SMOL, DataConfig().cache_dir)
    model = convert_to_bitnet(load_causal_lm(teacher, "float32"), "paper", num_layers=layers)
    return save_student(model, root / f"smollm2-{layers}", tokenizer=load_tokenizer(teacher))


def _wide_student(root: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from distillation.config.schema import DataConfig
    from distillation.models import load_tokenizer, resolve_model
    from distillation.student import convert_to_bitnet, save_student

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=WIDE["hidden"], intermediate_size=WIDE["intermediate"],
                         num_hidden_layers=WIDE["layers"], num_attention_heads=WIDE["heads"],
                         num_key_value_heads=WIDE["kv_heads"], tie_word_embeddings=True, max_position_embeddings=2048)
    model = convert_to_bitnet(AutoModelForCausalLM.from_config(config), "paper")
    return save_student(model, root / "wide", tokenizer=load_tokenizer(resolve_model(SMOL, DataConfig().cache_dir)))


def _stat(values) -> str:
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}, {max(values):,.0f}]"


def part_packed(root: Path, args, log) -> tuple:
    from distillation.config.schema import DataConfig
    from distillation.models import resolve_model
    from distillation.student.export import export_student

    rows, lines = [], ["| model | runtime | BitLinear weights MiB | all tensors MiB | RSS MiB (above imports) | "
                       "peak RSS MiB | prefill tok/s | greedy decode tok/s |", "|---|---|---|---|---|---|---|---|"]
    teacher = resolve_model(SMOL, DataConfig().cache_dir)
    for layers in args.layers:
        # the trained student where one is given (same shape as the converted 8-layer one)
        student = Path(args.student) if args.student and layers == 8 else _smol_student(root, layers)
        packed = root / f"{student.name}-packed"
        export_student(student, packed, "packed")
        for label, kind, path in [("packed 2-bit, fp32 embedding", "packed", packed),
                                  ("packed 2-bit, bf16 embedding", "packed-bf16", packed),
                                  ("dense fp32", "dense-fp32", packed), ("dense bf16", "dense-bf16", packed)]:
            log(f"packed part: {student.name} {label}")
            rows.append({"model": student.name, "runtime": label, **_measure(kind, path, args)})
    for label, kind in [("teacher fp32", "teacher-fp32"), ("teacher bf16", "teacher-bf16")]:
        log(f"packed part: {label}")
        rows.append({"model": "SmolLM2-135M (30 layers)", "runtime": label, **_measure(kind, teacher, args)})
    for r in rows:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['linear_mb']:.1f} | {r['tensors_mb']:.1f} | "
                     f"{r['rss_mb']:.0f} ({r['rss_mb'] - r['rss_base_mb']:+.0f}) | {r['peak_rss_mb']:.0f} | {_stat(r['prefill'])} | "
                     f"{_stat(r['decode'])} |")
    return rows, "\n".join(lines)


def part_llama(root: Path, args, log) -> tuple:
    from distillation.student.export import export_student

    rows, lines = [], ["| model | GGUF weights | tensors by type | file MiB | RSS MiB (above imports) | peak RSS MiB | "
                       "prefill tok/s | greedy decode tok/s |", "|---|---|---|---|---|---|---|---|"]
    students = [_smol_student(root, layers) for layers in args.layers] + [_wide_student(root)]
    for student in students:
        for kind in ("tq2_0", "tq1_0", "f16"):
            out = root / f"{student.name}-{kind}.gguf"
            types = export_student(student, out, "gguf", kind)["gguf_tensor_types"]
            log(f"llama part: {student.name} {kind}")
            rows.append({"model": student.name, "gguf": kind, "types": types, **_measure("gguf", out, args)})
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()))
        lines.append(f"| {r['model']} | {r['gguf']} | {types} | {r['file_mb']:.1f} | "
                     f"{r['rss_mb']:.0f} ({r['rss_mb'] - r['rss_base_mb']:+.0f}) | "
                     f"{r['peak_rss_mb']:.0f} | {_stat(r['prefill'])} | {_stat(r['decode'])} |")
    return rows, "\n".join(lines)


# -- quality ---------------------------------------------------------------------------------------------
def _texts(chars: int) -> dict:
    """Held-out documents of each default source (the split training never draws from) and the unseen
    English works, `chars` characters of each."""
    from bench.unseen import unseen_texts
    from distillation.config import load_config
    from distillation.data.sources import load_documents, split_of

    cfg = load_config([])
    d, texts = cfg.data, {}
    for s in d.sources:
        docs = [doc.text for doc in load_documents(s.name, s.kind, s.path, d.cache_dir, 400_000)
                if split_of(f"{s.name}/{doc.doc_id}", d.heldout_fraction, d.probe_fraction) == "heldout"]
        texts[f"held-out {s.name}"] = "\n\n".join(docs)[:chars]
    texts.update({f"unseen {k}": v[:chars] for k, v in unseen_texts(d.cache_dir).items()})
    return texts


def _gguf_score(path: Path, tokenizer, text: str, seq_len: int) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from distillation.data.packing import next_token_labels, predicted_bytes
    from distillation.student.generate import open_gguf
    from distillation.training.evaluate import text_rows

    packed = text_rows(tokenizer, text, seq_len)
    llm = open_gguf(path, n_ctx=seq_len, logits_all=True)
    nats = 0.0
    for row, length in zip(packed.rows, packed.lengths):
        llm.reset()
        llm.eval(row[:length].tolist())
        logits = torch.from_numpy(np.array(llm.scores[:length], dtype=np.float32))
        labels = next_token_labels(torch.as_tensor(row[None, :length]).long(), torch.tensor([length]))[0]
        nats += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
    llm.close()
    return nats / math.log(2) / predicted_bytes(packed, tokenizer)


def part_quality(root: Path, args, log) -> tuple:
    import torch
    from transformers import AutoModelForCausalLM

    from distillation.models import load_tokenizer
    from distillation.student import load_student, set_compile
    from distillation.student.export import export_student
    from distillation.training.evaluate import score_text

    torch.set_num_threads(2)
    set_compile(False)
    student = Path(args.student) if args.student else _smol_student(root, 8)
    tokenizer, texts = load_tokenizer(student), _texts(args.chars)
    exports = {"hf": root / "q-hf", "packed": root / "q-packed", "tq2_0": root / "q.tq2_0.gguf",
               "f16": root / "q.f16.gguf"}
    for fmt, out in exports.items():
        export_student(student, out, "gguf" if out.suffix == ".gguf" else fmt, fmt if out.suffix == ".gguf" else "tq2_0")
    scorers = {
        "load_student (reference)": lambda t: score_text(load_student(student), tokenizer, t, args.seq_len),
        "hf export, plain transformers": lambda t: score_text(AutoModelForCausalLM.from_pretrained(exports["hf"]),
                                                              tokenizer, t, args.seq_len),
        "packed export, load_student (kernel)": lambda t: score_text(load_student(exports["packed"]), tokenizer, t,
                                                                     args.seq_len),
        "packed export, plain transformers": lambda t: score_text(
            AutoModelForCausalLM.from_pretrained(exports["packed"]), tokenizer, t, args.seq_len),
    }
    rows = []
    for label, score in scorers.items():
        log(f"quality part: {label}")
        rows.append({"format": label, **{name: score(text)["bits_per_byte"] for name, text in texts.items()}})
    for kind in ("tq2_0", "f16"):
        log(f"quality part: gguf {kind}")
        rows.append({"format": f"GGUF {kind.upper()}, llama.cpp",
                     **{name: _gguf_score(exports[kind], tokenizer, text, args.seq_len) for name, text in texts.items()}})
    greedy = _greedy_agreement(student, exports["tq2_0"], tokenizer, args.new)
    names = list(texts)
    lines = ["| format | " + " | ".join(names) + " | mean | vs reference |", "|---|" + "---|" * (len(names) + 2)]
    reference = statistics.mean(rows[0][n] for n in names)
    for r in rows:
        mean = statistics.mean(r[n] for n in names)
        lines.append(f"| {r['format']} | " + " | ".join(f"{r[n]:.4f}" for n in names) +
                     f" | {mean:.4f} | {mean - reference:+.4f} |")
    lines += ["", f"Greedy decoding, {args.new} tokens: the student in PyTorch (`load_student`) against its TQ2_0 GGUF in "
              "llama.cpp; where they part, the PyTorch student's margin between the two tokens (logits).", "",
              "| prompt | PyTorch | llama.cpp | first divergence | margin there |", "|---|---|---|---|---|"]
    for g in greedy:
        first = "-" if g["first"] is None else g["first"]
        margin = "-" if g["margin"] is None else f"{g['margin']:.3f}"
        lines.append(f"| {g['prompt']!r} | {g['torch']!r} | {g['llama']!r} | {first} | {margin} |")
    return {"student": str(student), "rows": rows, "greedy": greedy}, "\n".join(lines)


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "To be, or not to be, that is",
           "In 1815, at 12:30, the 3 ships", "Once upon a time, in a small village,"]


def _greedy_agreement(student: Path, gguf_file: Path, tokenizer, new: int) -> list:
    import torch

    from distillation.student import load_student
    from distillation.student.generate import greedy_gguf, greedy_torch, open_gguf

    model, llm, out = load_student(student).eval(), open_gguf(gguf_file), []
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        ours, theirs = greedy_torch(model, ids, new), greedy_gguf(llm, ids, new, stop_at_eos=False)
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        margin = None
        if first is not None:
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids + ours[:first]])).logits[0, -1]
            margin = float(logits[ours[first]] - logits[theirs[first]])
        out.append({"prompt": prompt, "torch": tokenizer.decode(ours), "llama": tokenizer.decode(theirs),
                    "first": first, "margin": margin})
    llm.close()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench inference")
    parser.add_argument("--parts", nargs="+", default=["packed", "llama", "quality"], choices=["packed", "llama", "quality"])
    parser.add_argument("--student", help="a trained student folder (paper SubLN, SmolLM2 tokenizer) for quality "
                                          "and the first packed row; default: converted from SmolLM2")
    parser.add_argument("--layers", nargs="+", type=int, default=[8, 30], help="SmolLM2 student depths")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--chars", type=int, default=12_000, help="characters of each quality text")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)

    def log(message):
        print(f"[bench inference] {message}", file=sys.stderr, flush=True)

    result, tables = {"args": vars(args)}, []
    with tempfile.TemporaryDirectory() as tmp:
        for part, fn in (("packed", part_packed), ("llama", part_llama), ("quality", part_quality)):
            if part in args.parts:
                result[part], table = fn(Path(tmp), args, log)
                tables.append(f"### {part}\n\n{table}")
    result["table"] = "\n\n".join(tables)
    print(result["table"])
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--arm"]:
        kind, path, prompt, new, reps = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
        out = _llama_arm(path, prompt, new, reps) if kind == "gguf" else _torch_arm(kind, path, prompt, new, reps)
        print(json.dumps(out))
    else:
        main()
