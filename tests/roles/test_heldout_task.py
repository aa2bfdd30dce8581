"""Held-out scores computed in a Ray task placed as a training worker is, not in the driver."""

import os
from functools import partial

import numpy as np
import pytest

from conftest import tiny_student
from distillation.config.schema import TrainingConfig
from distillation.data.packing import pack
from distillation.errors import DistillError
from distillation.roles.heldout_task import score_on_worker, worker_options
from distillation.training.evaluate import heldout_loss


def _student_not_in(driver_pid: int, seed: int):
    if os.getpid() == driver_pid:
        raise AssertionError("the model was loaded in the driver")
    return tiny_student(seed)


def _broken():
    raise DistillError("teacher /models/x holds no weights")


def _training(**overrides):
    return TrainingConfig(**{"cpus_per_worker": 1.0, "num_threads": 1, **overrides})


def test_a_task_is_placed_as_a_training_worker_is():
    assert worker_options(_training()) == {"num_cpus": 1.0, "num_gpus": 0, "resources": {}}
    assert worker_options(_training(use_gpu=True, worker_resources={"student": 1})) == {
        "num_cpus": 1.0, "num_gpus": 1, "resources": {"student": 1}}
    assert worker_options(_training(use_gpu=True, worker_resources={"GPU": 0.5, "memory": 2e9})) == {
        "num_cpus": 1.0, "num_gpus": 0.5, "memory": 2e9, "resources": {}}


def test_models_are_scored_in_a_task_as_the_driver_would_score_them(ray_cluster):
    import sys

    from ray import cloudpickle

    import conftest

    for module in (sys.modules[__name__], conftest):  # the loaders below travel by value (tests/ is not a package)
        cloudpickle.register_pickle_by_value(module)
    rows = pack([np.random.default_rng(0).integers(1, 97, n) for n in (12, 7, 16)], 0, 16)
    here = [heldout_loss(tiny_student(seed), rows, 100) for seed in (0, 1)]
    there = score_on_worker(_training(), [(partial(_student_not_in, os.getpid(), seed), None) for seed in (0, 1)],
                            rows, 100, timeout_s=300)
    for mine, theirs in zip(here, there):
        assert theirs["loss"] == pytest.approx(mine["loss"], rel=1e-6) and theirs["tokens"] == mine["tokens"]
        assert theirs["parameters"] == sum(p.numel() for p in tiny_student(0).parameters())
    assert there[0]["loss"] != there[1]["loss"]
    with pytest.raises(DistillError, match="^teacher /models/x holds no weights$"):
        score_on_worker(_training(), [(_broken, None)], rows, 100, timeout_s=300)
    with pytest.raises(DistillError, match="waited 2 s for a training worker's resources .*'nowhere': 1"):
        score_on_worker(_training(worker_resources={"nowhere": 1}), [(_broken, None)], rows, 100, timeout_s=2)
