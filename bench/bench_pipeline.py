"""Table B: the distillation pipeline against its limit, same models, batches and machine, one run.

Every arm trains the CPU-default student (SmolLM2's first 8 layers as BitNet) with `--threads`
torch threads (default: every core) on batches of 4 x 256 tokens with logits-only BitDistill at
tau = 1 on top-32 + tail targets, the one setting every teacher kind serves (vLLM returns
temperature-1 log-probabilities and no Q/K/V):

- limit:     student steps on teacher targets already in memory (what the trainer could do alone);
- cached:    `distill teacher=cached` (Ray Data + Mixture + Ray Train; answers replayed from Parquet);
- hf:        `distill teacher=hf` (transformers teacher on Ray Serve, bf16, one thread);
- vllm:      `distill teacher=vllm` (vLLM engine on Ray Serve, bf16, one thread);
- sync:      the brief's original design: one process calls the teacher in-process, then steps the
             student, one thing at a time with every thread.

The Serve arms share the same cores between the teacher replica and the student, which overlap:
the teacher answers the next batches while the student steps.

Throughput is token positions per second per optimizer step (4 x 256 each, padding included: rows
hold one document each, and a padded position costs what a real one does), median and spread over
the steps after `--warmup`; the real-token fill of the pipeline's rows is shown beside it. Each
`--threads` setting is one table: 1 leaves the second core to the teacher and the pipeline, 2 gives
the student every core, shared with them.

    python -m bench pipeline [--steps 12] [--warmup 2] [--threads 1 2]
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

BASE = ["distillation=logits_only", "distillation.temperature=1", "teacher.signal=topk", "teacher.top_k=32",
        "data.max_tokens_per_source=20000", "run.progress=false"]


def _student_steps(cfg, batches, targets_for, threads: int, device: str) -> list:
    """Plain-torch training steps on `device` (bf16 autocast where the config asks for it);
    `targets_for(ids)` gives the teacher columns (timed with the step)."""
    from contextlib import nullcontext

    from distillation.data.packing import next_token_labels
    from distillation.losses import bitdistill_loss
    from distillation.models import resolve_model
    from distillation.specs import student_spec
    from distillation.student import build_student, set_compile
    from distillation.training.plan import loss_weights
    from distillation.training.step import targets_from_columns

    torch.set_num_threads(threads)
    set_compile(False)
    torch.manual_seed(0)
    student = build_student(student_spec(cfg, resolve_model(cfg.student.init_from, cfg.data.cache_dir))).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.training.lr, betas=(0.9, 0.95))
    weights = loss_weights(cfg.distillation)
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if cfg.training.autocast == "bf16" else nullcontext
    rates = []
    for ids in batches:
        start = time.perf_counter()
        columns = {k: torch.as_tensor(v).to(device) for k, v in targets_for(ids).items()}
        x = torch.as_tensor(ids).long().to(device)
        with autocast():
            logits = student(input_ids=x).logits
        out = bitdistill_loss(logits, next_token_labels(x), weights, targets_from_columns(columns))
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(ids.size / (time.perf_counter() - start))  # full rows: every position is real
    return rates


def _in_process(steps: int, threads: int) -> dict:
    from distillation.config import load_config
    from distillation.data.packing import full_rows
    from distillation.data.sources import load_documents
    from distillation.models import load_tokenizer, resolve_model
    from distillation.teachers.hf import HFTeacher

    cfg = load_config(BASE)
    model_dir = resolve_model(cfg.teacher.model, cfg.data.cache_dir)
    tokenizer = load_tokenizer(model_dir)
    docs = load_documents("shakespeare", "shakespeare", None, cfg.data.cache_dir, 100_000)
    rows = full_rows([np.array(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs], 256, 4 * steps)
    batches = [rows[i * 4:(i + 1) * 4] for i in range(steps)]
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() and cfg.teacher.num_gpus > 0 else "cpu"  # as the Ray arms place them
    teacher = HFTeacher(model_dir, 32, 1.0, None, dtype="bfloat16", signal="topk", device=device)
    answers = {i: teacher.score(b).to_columns() for i, b in enumerate(batches)}  # for the limit arm
    index = {id(b): i for i, b in enumerate(batches)}
    limit = _student_steps(cfg, batches, lambda ids: answers[index[id(ids)]], threads, device)
    sync = _student_steps(cfg, batches, lambda ids: teacher.score(ids).to_columns(), threads, device)
    return {"limit": limit, "sync": sync}


def _ray_arm(kind: str, steps: int, threads: int, out: str) -> tuple:
    """(positions/s per step, real-token fill per step) from the run's metrics (logged every step)."""
    from distillation.config import load_config
    from distillation.precompute import precompute
    from distillation.run import run
    from distillation.training.metrics import read_jsonl

    overrides = BASE + [f"training.max_steps={steps}", f"run.output_dir={out}", f"run.name={kind}-{threads}",
                        "training.warmup_steps=1", f"training.num_threads={threads}"]
    if kind == "cached":
        overrides += ["teacher=cached", f"teacher.cache_dir={out}/cache"]
        precompute(load_config(overrides))
    elif kind == "vllm":
        overrides += ["teacher=vllm", "teacher.max_model_len=512", "teacher.dtype=bfloat16"]
    cfg = load_config(overrides)
    positions = cfg.training.batch_size * cfg.training.grad_accum * cfg.data.seq_len
    rows = read_jsonl(run(cfg)["metrics"])
    real = np.diff([0] + [r["tokens"] for r in rows])
    seconds = real / np.array([r["tokens_per_s"] for r in rows])
    return (positions / seconds).tolist(), (real / positions).tolist()


def _stats(rates: list, warmup: int) -> dict:
    kept = rates[warmup:]
    return {"median": statistics.median(kept), "min": min(kept), "max": max(kept), "n": len(kept)}


def _table(rates: dict, fills: dict, warmup: int, threads: int) -> tuple:
    stats = {k: _stats(v, warmup) for k, v in rates.items()}
    limit = stats["limit"]["median"]
    lines = [f"| arm ({threads} student thread{'s' if threads > 1 else ''}) | positions/s (median [min, max]) "
             f"| vs limit | real-token fill |", "|---|---|---|---|"]
    for kind in ["limit", "cached", "hf", "vllm", "sync"]:
        if kind in stats:
            s = stats[kind]
            fill = f"{statistics.mean(fills[kind][warmup:]):.2f}" if kind in fills else "1.00"
            lines.append(f"| {kind} | {s['median']:.0f} [{s['min']:.0f}, {s['max']:.0f}] | "
                         f"{s['median'] / limit:.2f}x | {fill} |")
    return "\n".join(lines), stats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=["cached", "hf", "vllm"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count()])
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every arm (e.g. experiment=gpu)")
    args = parser.parse_args(argv)
    BASE.extend(args.extra)
    tables, results = [], {}
    with tempfile.TemporaryDirectory() as out:
        for threads in args.threads:
            rates, fills = _in_process(args.steps, threads), {}
            for kind in args.arms:
                rates[kind], fills[kind] = _ray_arm(kind, args.steps, threads, out)
            table, stats = _table(rates, fills, args.warmup, threads)
            print(table, flush=True)
            tables.append(table)
            results[threads] = {"stats": stats, "rates": rates, "fills": fills}
    return {"table": "\n\n".join(tables), "results": results, "steps": args.steps, "warmup": args.warmup}


if __name__ == "__main__":
    main()
