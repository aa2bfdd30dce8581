"""Held-out scores of the run's models, computed where a training worker runs (a Ray task with a
worker's CPUs, GPU and custom resources, on its device), so the driver never loads a model: on a
cluster its head may have no GPU and no room for a 1.7B teacher in fp32.

Each job is a loader (a picklable function returning the model, built on the task's node) and an
optional check of the loaded model that runs when its held-out loss is finite.
"""

import math
from typing import Callable, List, Optional, Tuple

import ray

from distillation.data.packing import Packed
from distillation.errors import get_or_raise
from distillation.training.evaluate import heldout_loss

Job = Tuple[Callable, Optional[Callable]]  # (load() -> model, check(model) or None)


def worker_options(tcfg) -> dict:
    """Ray options that place a task as a training worker is placed (ScalingConfig in run.py)."""
    resources = dict(tcfg.worker_resources)
    gpus = resources.pop("GPU", 1 if tcfg.use_gpu else 0)
    return {"num_cpus": tcfg.cpus_per_worker, "num_gpus": gpus, "resources": resources}


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


def score_on_worker(tcfg, jobs: List[Job], packed: Packed, num_bytes: int) -> List[dict]:
    """Each job's held-out loss, tokens, bits/byte and parameter count, in one task."""
    task = ray.remote(max_retries=0)(_score).options(**worker_options(tcfg))
    return get_or_raise(task.remote(jobs, packed, num_bytes, tcfg.num_threads))
