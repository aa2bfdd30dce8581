"""The optimizer step without Ray: a non-finite gradient skips the step and is counted; the
learning-rate schedule."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny_optimizer, tiny_student
from distillation.errors import DistillError
from distillation.training.step import NanGuard, lr_lambda


def test_a_non_finite_gradient_skips_the_step_counts_it_and_too_many_stop_the_run():
    model = tiny_student()
    optimizer, scheduler = tiny_optimizer(model)
    guard = NanGuard(max_skips=1)
    ids = torch.randint(0, 97, (2, 8))
    before = [p.detach().clone() for p in model.parameters()]
    (model(input_ids=ids, labels=ids).loss * float("nan")).backward()
    assert math.isnan(guard.step(model, optimizer, scheduler, clip=1.0))
    assert guard.skipped == 1 and scheduler.last_epoch == 1  # the schedule stays aligned with the data
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no update
    assert all(p.grad is None for p in model.parameters())
    model(input_ids=ids, labels=ids).loss.backward()
    assert math.isfinite(guard.step(model, optimizer, scheduler, clip=1.0))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # a finite step updates
    (model(input_ids=ids, labels=ids).loss * float("inf")).backward()
    with pytest.raises(DistillError, match="training.max_nan_steps=1"):
        guard.step(model, optimizer, scheduler, clip=1.0)


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    factor = lr_lambda(OmegaConf.create({"warmup_steps": 4, "max_steps": 20, "min_lr_ratio": 0.1}))
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0) and factor(12) == pytest.approx(0.55) and factor(20) == pytest.approx(0.1)
