"""Pin `attention_relation_loss` to the official BitDistill attention-relation (MiniLMv2) loss.

Source of the formula: microsoft/BitNet, pull request #382 (the BitDistill release, a LLaMA-Factory
fork), file `bitdistill/src/llamafactory/train/sft/trainer.py`, method
`CustomDistillSeq2SeqTrainer.compute_distill_loss`, the `minilmv2_loss_coeff != 0` branch. Its
shipped config (`bitdistill/yamls/training_args/sft_nli_bitnet_allnorm_distill.yaml`) uses
`split_head_number: 32`, `minilmv2_loss_coeff: 1e5`, `layers_used_for_distill: [22]`.

What that code does, in our words. The model returns, per layer, value, key and query states shaped
[B, num_heads, T, head_dim]. For each of `all_value_states`, `all_key_states`, `all_query_states`
(in that order) and each distilled layer, for student and teacher separately:
  1. concatenate the heads: transpose to [B, T, num_heads, head_dim], reshape to [B, T, W];
  2. re-split into `split_head_number` relation heads of width W / split_head_number and move the
     head axis forward: [B, split, T, W / split];
  3. L2-normalise along the last axis (`F.normalize(p=2, dim=-1)`);
  4. relation = X @ X^T, divided by a temperature hard-coded to 1.0;
  5. reshape to [B * split * T, T] and take a row softmax, for BOTH models (no log_softmax);
  6. clamp BOTH probability tables at min 1e-8;
  7. add `F.kl_div(torch.log(student_prob), teacher_prob, reduction="batchmean", log_target=False)`,
     i.e. sum of teacher * (log teacher - log student) over all entries / (B * split * T).
After both loops the sum is divided by `len(layers_used_for_distill) * split_head_number`, and the
trainer adds `minilmv2_loss_coeff * that` to the loss. There is no padding mask (padded positions
are rows and columns like any other), and no scaling by head_dim.

Two details of the transcription below:
- The official code reads `batch_size, num_heads, seq_len, head_dim` from the STUDENT tensor and
  reshapes the teacher with the student's total width, so it only runs when both models have the
  same Q/K/V widths (BitDistill distils a model into its own 1.58-bit copy). Relations are T x T
  whatever the width, so the reference here reshapes each model with its own width; with equal
  widths (the calibration pin) that is the official code exactly.
- With the temperature at 1 the relation logits are cosines in [-1, 1], so every probability is at
  least e^-2 / T; the 1e-8 clamp only bites beyond T of about 10^7 and is inert here (pinned by
  `test_official_clamp_is_inert_at_temperature_one_so_ours_needs_none`). Ours has no clamp.

Ours distils one layer, so `normalization="reference"` must equal the official value with one
layer: sum over v, k, q of the batchmean KL, divided by split_heads. `normalization="paper"` omits
that division (paper Eq. 11), so it is split_heads times larger.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from distillation.losses.attention import attention_relation_loss

OFFICIAL_KEYS = (("all_value_states", "v"), ("all_key_states", "k"), ("all_query_states", "q"))
OFFICIAL_GAMMA = 1e5          # minilmv2_loss_coeff in the shipped BitDistill config
OFFICIAL_SPLIT_HEADS = 32     # split_head_number in the shipped BitDistill config
RTOL = 1e-5                   # ours may run in float32
GRAD_RTOL = 1e-4


# ----------------------------------------------------------------------------------------------
# The official formula, transcribed in float64 (independent of distillation.losses.attention).
# ----------------------------------------------------------------------------------------------

def _official_relation_prob(states: torch.Tensor, split_head_number: int, eps: float) -> torch.Tensor:
    """States [B, num_heads, T, head_dim] -> clamped relation probabilities [B * split * T, T]."""
    batch_size, num_heads, seq_len, head_dim = states.shape
    total_dim = num_heads * head_dim
    if total_dim % split_head_number != 0:
        raise ValueError(f"total dimension {total_dim} not divisible by {split_head_number}")
    new_head_dim = total_dim // split_head_number
    x = states.double().transpose(1, 2).reshape(batch_size, seq_len, total_dim)
    x = x.reshape(batch_size, seq_len, split_head_number, new_head_dim).transpose(1, 2)
    x = F.normalize(x, p=2, dim=-1)
    relation = torch.matmul(x, x.transpose(-2, -1))
    temperature = 1.0  # hard-coded in the official code
    relation = relation / temperature
    relation = relation.reshape(-1, seq_len)
    prob = F.softmax(relation, dim=-1)
    return prob.clamp(min=eps)


def official_vv_distill_loss(teacher_layers, student_layers, split_head_number: int,
                             eps: float = 1e-8) -> torch.Tensor:
    """The official `vv_distill_loss` (before `minilmv2_loss_coeff`), float64.

    `teacher_layers` / `student_layers`: one dict per distilled layer, official key names
    (`all_value_states`, ...) -> [B, num_heads, T, head_dim].
    """
    assert len(teacher_layers) == len(student_layers) and teacher_layers
    vv_distill_loss = torch.zeros((), dtype=torch.float64)
    for compute_key, _ in OFFICIAL_KEYS:
        for t_layer, s_layer in zip(teacher_layers, student_layers):
            s_prob = _official_relation_prob(s_layer[compute_key], split_head_number, eps)
            t_prob = _official_relation_prob(t_layer[compute_key], split_head_number, eps)
            vv_distill_loss = vv_distill_loss + F.kl_div(torch.log(s_prob), t_prob,
                                                         reduction="batchmean", log_target=False)
    return vv_distill_loss / (len(teacher_layers) * split_head_number)


# ----------------------------------------------------------------------------------------------
# Inputs and the mapping to our API.
# ----------------------------------------------------------------------------------------------

def _random_layer(gen, batch, length, heads, kv_heads, head_dim, dtype=torch.float64):
    """One layer's states in the official per-head layout [B, heads, T, head_dim] (GQA k/v)."""
    shape = {"all_query_states": heads, "all_key_states": kv_heads, "all_value_states": kv_heads}
    return {key: torch.randn(batch, n, length, head_dim, generator=gen, dtype=dtype)
            for key, n in shape.items()}


def _concat_heads(states: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, head_dim] -> [B, T, heads * head_dim], the concatenation the official code does."""
    batch, heads, length, head_dim = states.shape
    return states.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _ours_layout(layer, dtype=torch.float32):
    return {short: _concat_heads(layer[key]).to(dtype) for key, short in OFFICIAL_KEYS}


def _ours(teacher_layer, student_layer, split_heads, normalization="reference", chunk_sequences=2):
    return attention_relation_loss(_ours_layout(teacher_layer), _ours_layout(student_layer), split_heads,
                                   temperature=1.0, mask=None, chunk_sequences=chunk_sequences,
                                   normalization=normalization)


def _as_float32_values(layer):
    """Round a layer to float32 values (kept in float64) so ours and the reference see identical inputs."""
    return {key: value.float().double() for key, value in layer.items()}


def _fixed_layer(phase: float, batch=2, length=6, heads=4, kv_heads=2, head_dim=32):
    """A deterministic, documented input: x[b, h, t, d] = sin(0.5 (t + 1) ((h * head_dim + d) % 7 + 1)
    + 0.9 b + phase + 0.3 key_index), i.e. q width 128, k/v width 64, 2 sequences of 6 tokens."""
    shape = {"all_query_states": heads, "all_key_states": kv_heads, "all_value_states": kv_heads}
    layer = {}
    for key_index, (key, n) in enumerate(shape.items()):
        b = torch.arange(batch, dtype=torch.float64).view(-1, 1, 1, 1)
        h = torch.arange(n, dtype=torch.float64).view(1, -1, 1, 1)
        t = torch.arange(length, dtype=torch.float64).view(1, 1, -1, 1)
        d = torch.arange(head_dim, dtype=torch.float64).view(1, 1, 1, -1)
        channel = torch.remainder(h * head_dim + d, 7.0)
        layer[key] = torch.sin(0.5 * (t + 1) * (channel + 1) + 0.9 * b + phase + 0.3 * key_index)
    return _as_float32_values(layer)


# The official vv_distill_loss (one layer, split_head_number 32) with _fixed_layer(0.0) as teacher and
# _fixed_layer(1.0) as student, computed once with official_vv_distill_loss in float64. With the
# shipped gamma = 1e5 it contributes about 923 to the training loss.
PINNED_OFFICIAL_VALUE = 0.009231074246718932


# ----------------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("split_heads", [8, 16])
@pytest.mark.parametrize("chunk_sequences", [1, 2, 8])
def test_reference_normalisation_equals_the_official_bitdistill_formula_across_widths(seed, split_heads,
                                                                                     chunk_sequences):
    gen = torch.Generator().manual_seed(1000 * seed + split_heads)
    batch = 2 + seed % 2          # 2 or 3 sequences (3 with chunk 2 leaves an uneven last chunk)
    length = 5 + 2 * seed         # 5, 7, 9 tokens
    # Teacher: 12 query heads x 8 = 96, GQA keys/values 6 x 8 = 48. Student: 8 x 8 = 64, k/v 4 x 8 = 32.
    teacher = _as_float32_values(_random_layer(gen, batch, length, heads=12, kv_heads=6, head_dim=8))
    student = _as_float32_values(_random_layer(gen, batch, length, heads=8, kv_heads=4, head_dim=8))

    official = official_vv_distill_loss([teacher], [student], split_heads)
    ours = _ours(teacher, student, split_heads, chunk_sequences=chunk_sequences)
    assert ours.dim() == 0
    torch.testing.assert_close(ours.double(), official, rtol=RTOL, atol=0.0)

    # Gradient w.r.t. every student state equals the float64 autograd gradient of the official formula.
    s32 = {key: value.float().requires_grad_(True) for key, value in student.items()}
    s64 = {key: value.clone().requires_grad_(True) for key, value in student.items()}
    ours_value = attention_relation_loss(_ours_layout(teacher), {short: _concat_heads(s32[key])
                                                                 for key, short in OFFICIAL_KEYS},
                                         split_heads, temperature=1.0, mask=None,
                                         chunk_sequences=chunk_sequences, normalization="reference")
    ours_grads = torch.autograd.grad(ours_value, [s32[key] for key, _ in OFFICIAL_KEYS])
    ref_grads = torch.autograd.grad(official_vv_distill_loss([teacher], [s64], split_heads),
                                    [s64[key] for key, _ in OFFICIAL_KEYS])
    for (key, _), g, rg in zip(OFFICIAL_KEYS, ours_grads, ref_grads):
        err = ((g.double() - rg).norm() / rg.norm()).item()
        assert err < GRAD_RTOL, f"{key}: gradient relative error {err:.2e}"


@pytest.mark.parametrize("split_heads", [4, 8, 16])
def test_paper_normalisation_is_split_heads_times_the_official_value(split_heads):
    gen = torch.Generator().manual_seed(77 + split_heads)
    teacher = _as_float32_values(_random_layer(gen, 3, 7, heads=12, kv_heads=6, head_dim=8))
    student = _as_float32_values(_random_layer(gen, 3, 7, heads=8, kv_heads=4, head_dim=8))

    reference = _ours(teacher, student, split_heads, "reference")
    paper = _ours(teacher, student, split_heads, "paper")
    official = official_vv_distill_loss([teacher], [student], split_heads)
    torch.testing.assert_close(paper.double(), split_heads * reference.double(), rtol=RTOL, atol=0.0)
    torch.testing.assert_close(paper.double(), split_heads * official, rtol=RTOL, atol=0.0)


def test_reference_normalisation_is_on_the_scale_official_gamma_1e5_was_tuned_for():
    """Calibration pin at the shipped setting split_head_number = 32, one distilled layer, equal
    teacher/student widths (so the reference is the official code verbatim), fixed input."""
    teacher, student = _fixed_layer(0.0), _fixed_layer(1.0)
    official = official_vv_distill_loss([teacher], [student], OFFICIAL_SPLIT_HEADS)
    torch.testing.assert_close(official, torch.tensor(PINNED_OFFICIAL_VALUE, dtype=torch.float64),
                               rtol=1e-9, atol=0.0)

    reference = _ours(teacher, student, OFFICIAL_SPLIT_HEADS, "reference").double()
    paper = _ours(teacher, student, OFFICIAL_SPLIT_HEADS, "paper").double()
    torch.testing.assert_close(reference, official, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(reference * OFFICIAL_SPLIT_HEADS, paper, rtol=RTOL, atol=0.0)
    # The term gamma multiplies is the official one, not 32x it: with gamma = 1e5 ours adds
    # gamma * reference to the loss, exactly what the official trainer adds.
    torch.testing.assert_close(OFFICIAL_GAMMA * reference, OFFICIAL_GAMMA * official, rtol=RTOL, atol=0.0)
    assert not math.isclose(reference.item(), OFFICIAL_SPLIT_HEADS * official.item(), rel_tol=0.5)


def test_two_layer_official_value_is_the_mean_of_our_one_layer_values():
    """The official code divides by len(layers_used_for_distill) * split: distilling L layers with
    gamma equals the mean of our one-layer losses, i.e. sum of ours with gamma / L per layer."""
    gen = torch.Generator().manual_seed(4242)
    split_heads = 8
    teachers = [_as_float32_values(_random_layer(gen, 2, 6, heads=12, kv_heads=6, head_dim=8)) for _ in range(2)]
    students = [_as_float32_values(_random_layer(gen, 2, 6, heads=8, kv_heads=4, head_dim=8)) for _ in range(2)]

    official = official_vv_distill_loss(teachers, students, split_heads)
    ours = [_ours(t, s, split_heads).double() for t, s in zip(teachers, students)]
    torch.testing.assert_close((ours[0] + ours[1]) / 2, official, rtol=RTOL, atol=0.0)
    for t, s, value in zip(teachers, students, ours):
        torch.testing.assert_close(value, official_vv_distill_loss([t], [s], split_heads), rtol=RTOL, atol=0.0)


def test_official_clamp_is_inert_at_temperature_one_so_ours_needs_none():
    """Worst case for the clamp: relation heads of width 1 with +-1 entries, so cosines are exactly
    +-1 and the smallest probability is e^-1 / (k e + (T - k) e^-1) >> 1e-8. The official value with
    and without the clamp coincide, and ours (no clamp) equals it."""
    gen = torch.Generator().manual_seed(9)
    split_heads, batch, length = 8, 2, 9

    def signs(heads, head_dim):
        return torch.randint(0, 2, (batch, heads, length, head_dim), generator=gen).double() * 2 - 1

    teacher = {"all_query_states": signs(2, 4), "all_key_states": signs(1, 8), "all_value_states": signs(1, 8)}
    student = {"all_query_states": signs(4, 2), "all_key_states": signs(2, 4), "all_value_states": signs(4, 2)}
    clamped = official_vv_distill_loss([teacher], [student], split_heads)
    unclamped = official_vv_distill_loss([teacher], [student], split_heads, eps=0.0)
    torch.testing.assert_close(clamped, unclamped, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(_ours(teacher, student, split_heads).double(), clamped, rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_packed_row_gives_the_official_value_of_its_documents_weighted_by_their_tokens(seed):
    """Row 0 packs documents of 5 and 3 tokens, row 1 holds one document of 4 tokens and 4 padding
    positions: the loss equals the official formula on each document as a sequence of its own, each
    weighted by its share of the 12 real tokens (the official mean is over rows; ours over all rows)."""
    gen = torch.Generator().manual_seed(seed)
    split_heads, length = 8, 8
    docs = [(0, 0, 5), (0, 5, 8), (1, 0, 4)]
    layers = {who: [_as_float32_values(_random_layer(gen, 1, z - a, heads=h, kv_heads=kv, head_dim=8))
                    for _, a, z in docs] for who, h, kv in (("teacher", 12, 6), ("student", 8, 4))}

    def packed(who):  # the documents laid into rows [2, heads, 8, head_dim], zeros where there is padding
        out = {key: torch.zeros(2, value.shape[1], length, 8, dtype=torch.float64)
               for key, value in layers[who][0].items()}
        for (b, a, z), layer in zip(docs, layers[who]):
            for key, value in layer.items():
                out[key][b, :, a:z] = value[0]
        return out

    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    segments = (positions == 0).long().cumsum(-1) - 1
    mask = torch.tensor([[True] * 8, [True] * 4 + [False] * 4])
    s32 = {key: value.float().requires_grad_(True) for key, value in packed("student").items()}
    ours = attention_relation_loss(_ours_layout(packed("teacher")), {short: _concat_heads(s32[key])
                                                                     for key, short in OFFICIAL_KEYS},
                                   split_heads, temperature=1.0, mask=mask, chunk_sequences=1,
                                   normalization="reference", segments=segments)
    s64 = [{key: value.clone().requires_grad_(True) for key, value in layer.items()} for layer in layers["student"]]
    official = sum((z - a) / 12 * official_vv_distill_loss([t], [s], split_heads)
                   for (_, a, z), t, s in zip(docs, layers["teacher"], s64))
    torch.testing.assert_close(ours.double(), official, rtol=RTOL, atol=0.0)

    ours_grads = torch.autograd.grad(ours, [s32[key] for key, _ in OFFICIAL_KEYS])
    for (key, _), g in zip(OFFICIAL_KEYS, ours_grads):
        ref = torch.autograd.grad(official, [s[key] for s in s64], retain_graph=True)
        for (b, a, z), rg in zip(docs, ref):
            err = ((g[b, :, a:z].double() - rg[0]).norm() / rg.norm()).item()
            assert err < GRAD_RTOL, f"{key} {b, a, z}: gradient relative error {err:.2e}"
        assert g[1, :, 4:].abs().max() == 0  # padding gets no gradient
