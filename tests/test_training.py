"""The training loop's pieces without Ray: full checkpoints round-trip exactly and refuse corrupt
files; a non-finite gradient skips the step and is counted; the learning-rate schedule."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from distillation.errors import DistillError
from distillation.student import convert_to_bitnet
from distillation.training.checkpoint import load_training_checkpoint, restore_optimizer, save_training_checkpoint
from distillation.training.loop import NanGuard, lr_lambda

from conftest import tiny_llama_config


def _student(seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return convert_to_bitnet(AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=97)), "paper")


def _optimizer(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tcfg = OmegaConf.create({"warmup_steps": 2, "max_steps": 10, "min_lr_ratio": 0.1})
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))


def _train_steps(model, optimizer, scheduler, n):
    for _ in range(n):
        ids = torch.randint(0, 97, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_checkpoint_round_trip_restores_model_optimizer_scheduler_and_rng_exactly():
    model = _student()
    optimizer, scheduler = _optimizer(model)
    _train_steps(model, optimizer, scheduler, 3)
    folder = save_training_checkpoint(model, optimizer, scheduler, OmegaConf.create({"a": 1}),
                                      {"step": 3, "data": {"count": 12}})
    expected_next = torch.rand(3)  # what the RNG gives right after the checkpoint

    torch.manual_seed(123)
    restored, state, tensors = load_training_checkpoint(folder)
    assert torch.equal(torch.rand(3), expected_next)
    optimizer2, scheduler2 = _optimizer(restored)
    restore_optimizer(optimizer2, scheduler2, state, tensors)
    assert state["step"] == 3 and state["data"] == {"count": 12}
    assert scheduler2.last_epoch == scheduler.last_epoch and scheduler2.get_last_lr() == scheduler.get_last_lr()
    for p, q in zip(model.parameters(), restored.parameters()):
        a, b = optimizer.state[p], optimizer2.state[q]
        assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(p, q), name
    # Continuing both gives the same parameters: nothing that matters was left out.
    torch.manual_seed(7)
    _train_steps(model, optimizer, scheduler, 2)
    torch.manual_seed(7)
    _train_steps(restored, optimizer2, scheduler2, 2)
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)


def test_corrupt_or_truncated_checkpoints_are_clear_errors():
    model = _student()
    optimizer, scheduler = _optimizer(model)
    _train_steps(model, optimizer, scheduler, 1)
    folder = save_training_checkpoint(model, optimizer, scheduler, OmegaConf.create({}), {"step": 1})
    blob = (folder / "optimizer.safetensors").read_bytes()
    (folder / "optimizer.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DistillError, match="incomplete or corrupt"):
        load_training_checkpoint(folder)
    (folder / "train_state.json").write_text('{"step": ')
    with pytest.raises(DistillError, match="cannot read train_state.json"):
        load_training_checkpoint(folder)
    weights = folder / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (folder / "train_state.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(DistillError, match="unreadable"):
        load_training_checkpoint(folder)


def test_a_non_finite_gradient_skips_the_step_counts_it_and_too_many_stop_the_run():
    model = _student()
    optimizer, scheduler = _optimizer(model)
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


def test_a_weighted_term_that_dwarfs_the_others_is_named_in_a_warning():
    from distillation.training.metrics import dominance_warning

    calibrated = {"ce_weighted": 8.7, "logits_kl_weighted": 7.0, "attention_weighted": 40.0}
    assert dominance_warning(calibrated) is None
    assert dominance_warning({"ce_weighted": 9.0, "logits_kl_weighted": 0.0, "attention_weighted": 0.0}) is None
    swamped = {"ce_weighted": 8.7, "logits_kl_weighted": 77.6, "attention_weighted": 10715.8}
    assert "gamma * L_AD is 124x the other loss terms" in dominance_warning(swamped)
