"""Held-out scores of the run's models, computed where a training worker runs (a Ray task with a
worker's CPUs, GPU and custom resources, on its device), so the driver never loads a model: on a
cluster its head may have no GPU and no room for a 1.7B teacher in fp32.

Each job is a loader (a picklable function returning the model, built on the task's node) and an
optional check of the loaded model that runs when its held-out loss is finite.
"""

import math
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import ray

from distillation.cluster import worker_bundle
from distillation.data.packing import Packed
from distillation.errors import DistillError, get_or_raise
from distillation.training.evaluate import heldout_loss

Job = Tuple[Callable, Optional[Callable]]  # (load() -> model, check(model) or None)


def starting_student(cfg, resumed_checkpoint, init_from=None):
    """The student training starts from: the checkpoint a resumed run continues, else stage 1's
    (from `init_from`, the driver's pinned source, as the workers build it)."""
    from distillation.student import build_student

    return build_student(cfg, init_from) if resumed_checkpoint is None else checkpoint_student(resumed_checkpoint)


def checkpoint_student(checkpoint):
    """The student of a training checkpoint (strict reload), read through Ray Train's storage."""
    from distillation.student import load_student

    with checkpoint.as_directory() as folder:
        return load_student(Path(folder) / "student")


def worker_options(tcfg) -> dict:
    """Ray task options that place a task as a training worker is placed."""
    bundle = worker_bundle(tcfg)
    options = {"num_cpus": bundle.pop("CPU"), "num_gpus": bundle.pop("GPU", 0)}
    if "memory" in bundle:
        options["memory"] = bundle.pop("memory")
    return {**options, "resources": bundle}


def _score(jobs: List[Job], packed: Packed, num_bytes: int, threads: int) -> List[dict]:
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if ray.get_gpu_ids() else "cpu"
    results = []
    for load, check in jobs:
        model = load().to(device)
        result = {**heldout_loss(model, packed, num_bytes), "parameters": sum(p.numel() for p in model.parameters())}
        if check is not None and math.isfinite(result["loss"]):
            check(model)
        results.append(result)
        del model
    return results


def score_on_worker(tcfg, jobs: List[Job], packed: Packed, num_bytes: int, timeout_s: float) -> List[dict]:
    """Each job's held-out loss, tokens, bits/byte and parameter count, in one task; a task the
    cluster cannot place within `timeout_s` (run.stall_timeout_s) is an error, not a silent wait.
    `max_calls=1`: the process that held the models exits with the task, so their memory goes too."""
    options = worker_options(tcfg)
    ref = ray.remote(max_retries=0, max_calls=1)(_score).options(**options).remote(
        jobs, packed, num_bytes, tcfg.num_threads)
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        raise DistillError(f"held-out scoring waited {timeout_s:.0f} s for a training worker's resources {options}; "
                           f"free now: {ray.available_resources()}")
    return get_or_raise(ref)
