"""One training step without Ray: the micro-step on packed rows, the optimizer step (a non-finite
gradient skips it and is counted), the learning-rate schedule."""

import math

import pytest
import torch

from conftest import tiny_optimizer, tiny_student
from distillation.config.schema import TrainingConfig
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
    factor = lr_lambda(TrainingConfig(warmup_steps=4, max_steps=20, min_lr_ratio=0.1))
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0) and factor(12) == pytest.approx(0.55) and factor(20) == pytest.approx(0.1)


def test_a_packed_micro_step_equals_the_step_on_its_documents_as_rows_of_their_own():
    """CE and the attention relations of [doc A | doc B] with per-document positions equal those of A
    and B in padded rows of their own: values and gradients (a plain float model, so no ternary
    rounding; the student's attention kernel is the model's own)."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config
    from distillation.data.packing import pack, pack_documents
    from distillation.losses import QKV, LossWeights
    from distillation.models import capture_qkv, forward_rows
    from distillation.teachers.schema import PREFIX
    from distillation.training.step import micro_step

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=97))
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=97, hidden=96, heads=6, kv_heads=3))
    docs = [torch.randint(1, 97, (n,)).numpy() for n in (5, 3)]
    weights = LossWeights(ce_weight=1.0, logits_weight=0.0, attention_weight=10.0, temperature=1.0,
                          temperature_squared=True, split_heads=4, attention_temperature=1.0,
                          attention_normalization="reference", chunk_tokens=512)

    def step(packed):
        batch = {"input_ids": torch.as_tensor(packed.rows), "length": torch.as_tensor(packed.lengths)}
        positions = None
        if packed.positions is not None:
            batch["positions"] = positions = torch.as_tensor(packed.positions).long()
        with torch.no_grad(), capture_qkv(teacher, 0) as states:
            forward_rows(teacher, batch["input_ids"].long(), positions)
        batch.update({PREFIX + key: states[key] for key in QKV})
        student.zero_grad()
        with capture_qkv(student, 0) as student_qkv:
            out = micro_step(student, batch, weights, 97, student_qkv=student_qkv)
        return out, [p.grad.clone() for p in student.parameters()]

    together, apart = pack_documents(docs, 0, 8), pack(docs, 0, 8)
    assert len(together.rows) == 1 and len(apart.rows) == 2
    (packed, packed_grads), (single, single_grads) = step(together), step(apart)
    assert packed.attention > 0 and packed.ce > 0
    torch.testing.assert_close(packed.ce, single.ce)
    torch.testing.assert_close(packed.attention, single.attention)
    for g, r in zip(packed_grads, single_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert step(together._replace(positions=None))[0].ce != packed.ce  # the same row without positions differs
