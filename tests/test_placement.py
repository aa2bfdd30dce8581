"""Placement across several Ray nodes on one machine (custom resources): teacher replicas land on
the teacher node and training workers on the student node; asking for more workers than the
cluster can place is a clear error, not a hang."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distillation.config import load_config
from distillation.errors import DistillError

from conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_teacher_replicas_and_train_workers_land_on_their_nodes(tiny_teacher, tmp_path):
    out = tmp_path / "placed.json"
    overrides = [o for o in tiny_overrides(tiny_teacher, tmp_path, steps=2)]
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_placement.py")), str(out),
                             *overrides, "run.progress=false"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    placed = json.loads(out.read_text())
    assert placed["steps"] == 2
    assert placed["replicas"] == [placed["nodes"]["teacher"]]
    assert placed["train_workers"] == [placed["nodes"]["student"]]


def test_more_workers_than_the_cluster_can_place_is_a_clear_error(ray_cluster):
    from distillation.run import check_placement

    with pytest.raises(DistillError, match="training.num_workers=5 workers .* cannot be placed"):
        check_placement(load_config(["training.num_workers=5"]))
    with pytest.raises(DistillError, match="cannot be placed"):
        check_placement(load_config(["placement=labelled"]))  # no node offers `student` here
