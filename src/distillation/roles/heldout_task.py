"""Role: the held-out scoring task, a Ray task (one process, `max_calls=1`) the driver starts twice
per run: before training (the starting student and the teacher) and after it (the final student).
It is placed as a training worker is placed (`worker_bundle`, roles/train_worker.py), so the driver
never loads a model: on a cluster its head may have no GPU and no room for a 1.7B teacher in fp32.

Each job is a loader (a picklable function returning the model, built on the task's node) and an
optional check of the loaded model that runs when its held-out loss is finite (training/evaluate.py).
"""

from typing import List, Optional, cast

import ray

from distillation.config.schema import TrainingConfig
from distillation.data.packing import Packed
from distillation.errors import DistillError, get_or_raise
from distillation.roles.train_worker import worker_bundle
from distillation.tasks.probe import TaskProbe
from distillation.training.evaluate import Job, score_models


def worker_options(t: TrainingConfig) -> dict:
    """Ray task options that place a task as a training worker is placed."""
    bundle = worker_bundle(t)
    options = {"num_cpus": bundle.pop("CPU"), "num_gpus": bundle.pop("GPU", 0)}
    if "memory" in bundle:
        options["memory"] = bundle.pop("memory")
    return {**options, "resources": bundle}


def _score(jobs: List[Job], packed: Packed, num_bytes: int, threads: int, task: Optional[TaskProbe]) -> List[dict]:
    import torch

    torch.set_num_threads(threads)
    return score_models(jobs, packed, num_bytes, "cuda" if ray.get_gpu_ids() else "cpu", task)


def score_on_worker(t: TrainingConfig, jobs: List[Job], packed: Packed, num_bytes: int, timeout_s: float,
                    task: Optional[TaskProbe] = None) -> List[dict]:
    """Each job's held-out loss, tokens, bits/byte and parameter count (and `task`'s metrics), in one task; a task the
    cluster cannot place within `timeout_s` (run.stall_timeout_s) is an error, not a silent wait.
    `max_calls=1`: the process that held the models exits with the task, so their memory goes too."""
    options = worker_options(t)
    ref = ray.remote(max_retries=0, max_calls=1)(_score).options(**options).remote(
        jobs, packed, num_bytes, t.num_threads, task)
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        raise DistillError(f"held-out scoring waited {timeout_s:.0f} s for a training worker's resources {options}; "
                           f"free now: {ray.available_resources()}")
    return cast(List[dict], get_or_raise(ref))  # ray.get is untyped
