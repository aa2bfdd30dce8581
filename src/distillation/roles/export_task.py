"""Role: the export task, a Ray task on the driver's node (zero CPUs, one process that exits with it)
that writes `student.export`'s formats beside the run's student/ (student/export.py) when training
ends, so the driver never loads a model."""

from pathlib import Path
from typing import Sequence, cast

import ray

from distillation.errors import get_or_raise
from distillation.student.export import export_run_student


def export_formats(student_dir: Path, run_dir: Path, formats: Sequence[str]) -> dict:
    """`student.export`, in a Ray task on this node (it writes beside the run's folder) rather than in
    the driver, which never loads a model; zero CPUs, so it is placed at once even on a head node that
    books none, and its process exits with it (max_calls=1)."""
    if not formats:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ref = ray.remote(max_retries=0, max_calls=1, num_cpus=0)(export_run_student).options(
        scheduling_strategy=here).remote(student_dir, run_dir, list(formats))
    return cast(dict, get_or_raise(ref))  # ray.get is untyped
