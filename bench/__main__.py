"""`python -m bench TABLE [options]`: run one benchmark table and write its markdown and JSON.

    quality   Table A: teacher vs BitNet-SFT, BitDistill logits, logits + attention, each +/- stage 2
    mixture   influence-weighted vs uniform mixing: tokens to reach uniform's final target loss
    pipeline  Table B: the pipeline (cached, transformers and vLLM teachers on Serve, in-process
              synchronous teacher) against the student-only limit
    sweep     the defaults sweep: tau, teacher signal, lambda, gamma, layer pairing, lr (--budget N: N x steps)
    gpu       the GPU check: tests marked gpu, an experiment=gpu run, the pipeline table on the GPU
    data      the data side at scale: streamed 1x/10x/100x JSONL and Parquet corpora, teacher cache replay
    inference the student where users run it: packed runtime and llama.cpp (memory, prefill, decode),
              and the bits/byte of every export format
    tasks     the paper's Table 1 in miniature: FP-SFT, BitNet-SFT, BitDistill on each task's held-out
              records, 3 seeds, and the loss ablation on one task
    cost      Table C: bytes/token and KL error per teacher-target form, and the loss's peak memory
              against the naive version (bench_targets.py and bench_losses.py, each in its own process)

Results go to bench/results/<table>.md and .json, stamped with the date and machine; the README
quotes the latest. Scripts run on CPU here and use a GPU when one is present.
"""

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    where = f"{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()} cores, {where}, torch {torch.__version__}"


def _script(name: str, args) -> str:
    """A benchmark script in a fresh process (peak-memory numbers must not share a heap)."""
    done = subprocess.run([sys.executable, str(Path(__file__).with_name(name)), *args], capture_output=True,
                          text=True, check=True)
    return done.stdout


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("quality", "mixture", "pipeline", "sweep", "gpu", "data", "cost",
                                                                    "inference", "tasks"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    table, rest = argv[0], argv[1:]
    if table == "quality":
        from bench.bench_quality import main as run_table

        result = run_table(rest)
    elif table == "mixture":
        from bench.bench_mixture import main as run_table

        result = run_table(rest)
    elif table == "sweep":
        from bench.bench_sweep import main as run_table

        result = run_table(rest)
        table = f"sweep-{result['budget']}x"
    elif table == "gpu":
        from bench.bench_gpu import main as run_table

        result = run_table(rest)
    elif table == "data":
        from bench.bench_data import main as run_table

        result = run_table(rest)
    elif table == "inference":
        from bench.bench_inference import main as run_table

        result = run_table(rest)
    elif table == "tasks":
        from bench.bench_tasks import main as run_table

        result = run_table(rest)
    elif table == "pipeline":
        from bench.bench_pipeline import main as run_table

        result = run_table(rest)
    else:
        result = {"table": _script("bench_targets.py", rest) + "\n" + _script("bench_losses.py", [])}
    RESULTS.mkdir(exist_ok=True)
    stamp = f"{date.today().isoformat()}, {machine()}"
    (RESULTS / f"{table}.md").write_text(f"<!-- {stamp} -->\n{result['table']}\n")
    (RESULTS / f"{table}.json").write_text(json.dumps({"machine": stamp, **result}, indent=1, default=float))
    print(f"\nwritten: {RESULTS / table}.md and .json ({stamp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
