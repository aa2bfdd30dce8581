"""Placement across several Ray nodes on one machine (custom resources): teacher replicas land on
the teacher node and training workers on the student node; asking for more workers than the
cluster can place is a clear error, not a hang; so is a run whose workers never start."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from distillation.config import load_config
from distillation.errors import DistillError


@pytest.mark.slow
def _sections(overrides):
    cfg = load_config(overrides)
    return cfg.training, cfg.teacher


def test_teacher_replicas_and_train_workers_land_on_their_nodes(tiny_teacher, tmp_path):
    out = tmp_path / "placed.json"
    overrides = tiny_overrides(tiny_teacher, tmp_path, steps=2)
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_placement.py")), str(out),
                             *overrides, "run.progress=false"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    placed = json.loads(out.read_text())
    assert placed["steps"] == 2
    assert placed["replicas"] == [placed["nodes"]["teacher"]]
    assert placed["train_workers"] == [placed["nodes"]["student"]]


@pytest.mark.slow
def test_more_workers_or_replicas_than_the_cluster_can_place_is_a_clear_error(ray_cluster):
    from distillation.cluster import check_placement

    with pytest.raises(DistillError, match="training.num_workers=5 workers .* cannot be placed"):
        check_placement(*_sections(["training.num_workers=5"]))
    with pytest.raises(DistillError, match="cannot be placed"):
        check_placement(*_sections(["placement=labelled"]))  # no node offers `student` here
    # the teacher pool and the workers together: 2 CPUs hold one replica and one worker, not two workers
    check_placement(*_sections([]))
    with pytest.raises(DistillError, match=r"num_workers=2 .* room for 1 beside 1 teacher replica\(s\)"):
        check_placement(*_sections(["training.num_workers=2"]))
    check_placement(*_sections(["training.num_workers=2"]), uses_teacher=False)  # CE only: no pool
    with pytest.raises(DistillError, match="teacher.min_replicas=3 replicas of .* cannot be placed"):
        check_placement(*_sections(["teacher.min_replicas=3", "teacher.max_replicas=3"]))


@pytest.mark.parametrize("nodes,replica,replicas,worker,workers,fits", [
    # a GPU node and a CPU node: the replica must take the CPU node, whichever node is listed first
    ([{"CPU": 4, "GPU": 1}, {"CPU": 4}], {"CPU": 4}, 1, {"CPU": 4, "GPU": 1}, 1, True),
    ([{"CPU": 4}, {"CPU": 4, "GPU": 1}], {"CPU": 4, "GPU": 1}, 1, {"CPU": 4}, 1, True),
    ([{"CPU": 1}], {"CPU": 0.5}, 0, {"CPU": 0.05}, 20, True),  # float remainders are Ray's 1e-4 units
    ([{"CPU": 2}], {"CPU": 1}, 1, {"CPU": 1}, 2, False),
    ([{"CPU": 8, "GPU": 1}], {"CPU": 1, "GPU": 1}, 1, {"CPU": 1, "GPU": 1}, 1, False),
])
def test_placement_fits_replicas_and_workers_together_in_either_order(nodes, replica, replicas, worker, workers,
                                                                      fits):
    from distillation.cluster import placement_problem

    problem = placement_problem(nodes, replica, replicas, worker, workers)
    assert (problem == "") == fits, problem
    if not fits:
        assert "cannot be placed" in problem and "beside 1 teacher replica(s)" in problem


@pytest.mark.slow
def test_a_run_whose_workers_never_start_stops_after_the_stall_timeout(tiny_teacher, ray_cluster, tmp_path):
    """Labelled placement with the up-front check off, as on an autoscaling cluster, but the student
    nodes never come: the held-out scoring before training (placed as a worker is) would wait forever;
    the driver stops, says what it waited for, exits 2, and has written no run folder. A separate
    driver process, so that ending it also ends what it leaves waiting."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    result = subprocess.run([sys.executable, "-m", "distillation.cli", *tiny_overrides(tiny_teacher, tmp_path),
                             "distillation=ce_only", "placement=labelled", "run.check_placement=false",
                             "run.stall_timeout_s=20"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: held-out scoring waited 20 s for a training worker's resources" in result.stderr
    assert "'student': 1" in result.stderr and not (tmp_path / "e2e").exists()
