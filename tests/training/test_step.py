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


def _response_rows(seed: int = 0, vocab: int = 97, k: int = 8):
    """Four rows of records whose responses (the labelled tokens) differ in length, 3 to 13 labels,
    with a teacher's top-k answer for every position."""
    from distillation.teachers.schema import PREFIX

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (4, 16), generator=generator)
    lengths = torch.tensor([16, 12, 16, 9])
    labelled = torch.zeros(4, 16, dtype=torch.bool)
    for row, first in enumerate((13, 2, 3, 5)):  # the response starts here and runs to the row's end
        labelled[row, first:lengths[row]] = True
    teacher = torch.log_softmax(torch.randn(4, 16, vocab, generator=generator) * 3, -1)
    top = teacher.topk(k, -1)
    return {"input_ids": ids, "length": lengths, "labelled": labelled, PREFIX + "topk_ids": top.indices,
            PREFIX + "topk_logprobs": top.values, PREFIX + "tail_mass": 1 - top.values.exp().sum(-1),
            PREFIX + "temperature": torch.ones(4)}


def _half(batch: dict, rows) -> dict:
    return {key: value[rows] for key, value in batch.items()}


WEIGHTS_CE_KL = dict(ce_weight=1.0, logits_weight=10.0, attention_weight=0.0, temperature=1.0, temperature_squared=True,
                     split_heads=4, attention_temperature=1.0, attention_normalization="reference", chunk_tokens=7)


def _grads(model, batches, n_labels, grad_scale):
    from distillation.losses import LossWeights
    from distillation.training.step import micro_step

    model.zero_grad()
    for batch in batches:
        micro_step(model, batch, LossWeights(**WEIGHTS_CE_KL), 97, grad_scale=grad_scale, n_labels=n_labels)
    return [p.grad.clone() for p in model.parameters()]


def test_two_micro_batches_with_different_label_counts_give_the_full_batchs_gradient():
    """Labels on responses only: the halves hold 3 + 10 and 13 + 4 labels. Dividing by the step's
    labels per micro-batch gives the full batch's gradient; a mean per micro-batch does not."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config
    from distillation.losses import IGNORE_INDEX
    from distillation.training.step import batch_labels, labels_per_micro_batch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=97))
    batch = _response_rows()
    halves = [_half(batch, slice(0, 2)), _half(batch, slice(2, 4))]
    counts = [int((batch_labels(h)[3] != IGNORE_INDEX).sum()) for h in halves]
    assert counts == [3 + 10, 13 + 4] and labels_per_micro_batch(halves, world=1) == sum(counts) / 2
    full = _grads(model, [batch], None, 1.0)
    accumulated = _grads(model, halves, labels_per_micro_batch(halves, world=1), 0.5)
    for g, r in zip(accumulated, full):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    per_micro_mean = _grads(model, halves, None, 0.5)
    assert not all(torch.allclose(g, r, rtol=1e-3) for g, r in zip(per_micro_mean, full))


def _two_ranks(rank: int, full: list):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config
    from distillation.training.parallel import gradient_sync
    from distillation.training.step import labels_per_micro_batch

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=97)))
    batch = _response_rows()
    mine = [_half(batch, [rank]), _half(batch, [rank + 2])]  # rank 0: 3 + 13 labels, rank 1: 10 + 4
    n_labels = labels_per_micro_batch(mine, world=2)
    assert n_labels == (3 + 13 + 10 + 4) / 4
    model.zero_grad()
    for micro, part in enumerate(mine):
        with gradient_sync(model, sync=micro == 1):
            _grads_into(model, part, n_labels)
    for g, r in zip([p.grad for p in model.module.parameters()], full):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def _grads_into(model, batch, n_labels):
    from distillation.losses import LossWeights
    from distillation.training.step import micro_step

    micro_step(model, batch, LossWeights(**WEIGHTS_CE_KL), 97, grad_scale=0.5, n_labels=n_labels)


def test_two_workers_two_micro_batches_each_give_the_full_batchs_gradient():
    """As above across two DDP ranks (gloo): the step's label count is summed over the ranks."""
    from transformers import AutoModelForCausalLM

    from conftest import spawn_gloo_ranks, tiny_llama_config

    torch.manual_seed(0)
    full = _grads(AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=97)), [_response_rows()], None, 1.0)
    spawn_gloo_ranks(_two_ranks, full)


@pytest.mark.parametrize("tied", [True, False])
def test_the_micro_step_applies_the_students_head_inside_the_loss_and_matches_float64(tied):
    """The step passes the final hidden states and the head to the chunked loss (the forward pass
    returns no logits): every parameter's gradient, the tied embedding included, equals the float64
    autograd loss of the model's own logits; a head the loss cannot rebuild is left to the model."""
    import copy

    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config
    from distillation.losses import LossWeights, SparseTargets, cross_entropy, logits_kl
    from distillation.models import forward_rows
    from distillation.teachers.schema import PREFIX
    from distillation.training.step import batch_labels, fused_output_head, micro_step

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=104, tie_word_embeddings=tied))
    assert fused_output_head(model) is model.lm_head
    batch = _response_rows()
    out = micro_step(model, batch, LossWeights(**WEIGHTS_CE_KL), 97)
    ce, kl = out.ce.item(), out.logits_kl.item()
    reference = copy.deepcopy(model).double()
    reference.zero_grad()
    input_ids, _, _, labels = batch_labels(batch)
    logits = forward_rows(reference, input_ids).logits[..., :97]  # the head is padded past the shared vocabulary
    targets = SparseTargets(batch[PREFIX + "topk_ids"], batch[PREFIX + "topk_logprobs"].double(),
                            batch[PREFIX + "tail_mass"].double(), 1.0)
    ref_ce, ref_kl = cross_entropy(logits, labels), logits_kl(logits, targets, labels, 1.0)
    (ref_ce + 10.0 * ref_kl).backward()
    assert math.isclose(ce, ref_ce.item(), rel_tol=1e-5) and math.isclose(kl, ref_kl.item(), rel_tol=1e-5)
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        err = ((p.grad.double() - r.grad).norm() / r.grad.norm()).item()
        assert err < 1e-5, f"{name}: gradient relative error {err:.2e}"
    model.config.final_logit_softcapping = 30.0  # applied after the head: only the model's logits have it
    assert fused_output_head(model) is None


def test_activation_checkpointing_gives_the_same_gradients_for_ce_kl_and_the_relations():
    """`training.activation_checkpointing` recomputes each layer in the backward pass: the gradients
    of CE + KL + the Q/K/V relations (captured inside a recomputed layer) are those of the plain step."""
    import copy

    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config
    from distillation.losses import QKV, LossWeights
    from distillation.models import capture_qkv
    from distillation.teachers.schema import PREFIX
    from distillation.training.step import micro_step

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=97))
    recomputed = copy.deepcopy(plain)
    recomputed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert recomputed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    batch = _response_rows()
    generator = torch.Generator().manual_seed(1)
    batch.update({PREFIX + key: torch.randn(4, 16, 64, generator=generator) for key in QKV})
    weights = LossWeights(**{**WEIGHTS_CE_KL, "attention_weight": 100.0})
    grads = []
    for model in (plain, recomputed):
        model.train()
        with capture_qkv(model, 1) as states:
            out = micro_step(model, batch, weights, 97, student_qkv=states)
        assert out.attention > 0
        grads.append([p.grad.clone() for p in model.parameters()])
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
