"""Every loss against an independent float64 reference on fresh random inputs: values and gradients."""

import math

import pytest
import torch

from distillation.losses import (IGNORE_INDEX, LossWeights, SparseTargets, attention_relation_loss, bitdistill_loss,
                                 cross_entropy, dense_kl, sparse_kl)


def _labels(batch, length, vocab, gen, ignore_last=True):
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    if ignore_last:
        labels[:, -1] = IGNORE_INDEX
    labels[0, 1] = IGNORE_INDEX  # a masked position inside a row, too
    return labels


def _ref_kl(t_logits, s_logits, labels, tau, squared):
    """sum_v p log(p / q) in float64 with explicit softmax, masked mean over labelled positions."""
    p = torch.softmax(t_logits.double() / tau, -1)
    q = torch.softmax(s_logits.double() / tau, -1)
    per = (p * (p.log() - q.log())).sum(-1)
    mask = (labels != IGNORE_INDEX).double()
    return (tau**2 if squared else 1.0) * (per * mask).sum() / mask.sum()


def _sparse_from_dense(t_logits, k, tau):
    lp = torch.log_softmax(t_logits.double() / tau, -1)
    top = lp.topk(k, -1)
    tail = 1.0 - top.values.exp().sum(-1)
    return SparseTargets(ids=top.indices.int(), logprobs=top.values.float(), tail_mass=tail.float(), temperature=tau)


def _ref_sparse_kl(t_logits, s_logits, ids, labels, tau, squared):
    """KL over the top-k ids plus one bucket for everything else, from the full teacher distribution."""
    p = torch.softmax(t_logits.double() / tau, -1)
    q = torch.softmax(s_logits.double() / tau, -1)
    p_top, q_top = p.gather(-1, ids.long()), q.gather(-1, ids.long())
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    per = (p_top * (p_top.log() - q_top.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    mask = (labels != IGNORE_INDEX).double()
    return (tau**2 if squared else 1.0) * (per * mask).sum() / mask.sum()


@pytest.fixture
def gen():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run, seed in the repr
    return g


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (g,) = torch.autograd.grad(value, x)
    return value.detach(), g


def test_cross_entropy_matches_float64_reference(gen):
    logits = torch.randn(3, 7, 50, generator=gen) * 3
    labels = _labels(3, 7, 50, gen)

    def ref(x):
        lp = torch.log_softmax(x.double(), -1)
        mask = labels != IGNORE_INDEX
        return -lp[mask].gather(-1, labels[mask][:, None]).mean()

    v, g = _grad(lambda x: cross_entropy(x, labels), logits)
    rv, rg = _grad(ref, logits.double())
    torch.testing.assert_close(v.double(), rv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("tau,squared", [(1.0, True), (5.0, True), (2.0, False)])
def test_dense_kl_matches_float64_reference(gen, tau, squared):
    t, s = torch.randn(2, 9, 40, generator=gen) * 4, torch.randn(2, 9, 40, generator=gen) * 4
    labels = _labels(2, 9, 40, gen)
    v, g = _grad(lambda x: dense_kl(x, t, labels, tau, squared), s)
    rv, rg = _grad(lambda x: _ref_kl(t, x, labels, tau, squared), s.double())
    torch.testing.assert_close(v.double(), rv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k", [1, 5, 31])
def test_sparse_kl_matches_float64_topk_plus_tail_reference(gen, k):
    vocab, tau = 64, 5.0
    t, s = torch.randn(2, 6, vocab, generator=gen) * 6, torch.randn(2, 6, vocab, generator=gen) * 6
    labels = _labels(2, 6, vocab, gen)
    targets = _sparse_from_dense(t, k, tau)
    v, g = _grad(lambda x: sparse_kl(x, targets, labels, tau), s)
    rv, rg = _grad(lambda x: _ref_sparse_kl(t, x, targets.ids, labels, tau, True), s.double())
    torch.testing.assert_close(v.double(), rv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g.double(), rg, rtol=1e-3, atol=1e-7)


def test_sparse_kl_with_full_vocabulary_equals_dense_kl(gen):
    vocab, tau = 32, 2.0
    t, s = torch.randn(2, 5, vocab, generator=gen) * 3, torch.randn(2, 5, vocab, generator=gen) * 3
    labels = _labels(2, 5, vocab, gen)
    targets = _sparse_from_dense(t, vocab, tau)
    v, g = _grad(lambda x: sparse_kl(x, targets, labels, tau), s)
    rv, rg = _grad(lambda x: _ref_kl(t, x, labels, tau, True), s.double())
    torch.testing.assert_close(v.double(), rv, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-7)


def test_sparse_kl_is_zero_when_student_equals_teacher_and_positive_otherwise(gen):
    t = torch.randn(1, 4, 30, generator=gen) * 3
    labels = _labels(1, 4, 30, gen)
    targets = _sparse_from_dense(t, 8, 3.0)
    assert sparse_kl(t, targets, labels, 3.0).abs() < 1e-5
    assert sparse_kl(t + torch.randn(t.shape, generator=gen), targets, labels, 3.0) > 1e-4


def test_sparse_kl_rejects_a_temperature_applied_twice(gen):
    t = torch.randn(1, 3, 10, generator=gen)
    targets = _sparse_from_dense(t, 4, 5.0)
    with pytest.raises(ValueError, match="temperature"):
        sparse_kl(t, targets, _labels(1, 3, 10, gen), 1.0)


def test_losses_are_means_not_sums_over_positions(gen):
    t, s = torch.randn(1, 4, 20, generator=gen), torch.randn(1, 4, 20, generator=gen)
    labels = torch.randint(0, 20, (1, 4), generator=gen)
    short = dense_kl(s, t, labels, 1.0)
    long = dense_kl(s.repeat(1, 8, 1), t.repeat(1, 8, 1), labels.repeat(1, 8), 1.0)
    torch.testing.assert_close(short, long)


def _ref_attention(teacher, student, heads, tau, mask):
    """Per sequence, only its real tokens: relations among them, mean row KL, summed over q, k, v."""
    total = 0.0
    for key in "qkv":
        rows_kl = []
        for b in range(teacher[key].shape[0]):
            keep = slice(None) if mask is None else mask[b]
            rel = []
            for x in (teacher[key][b, keep], student[key][b, keep]):
                n, w = x.shape
                x = x.double().view(n, heads, w // heads).transpose(0, 1)
                x = x / x.norm(dim=-1, keepdim=True)
                rel.append(torch.softmax(x @ x.transpose(-1, -2) / tau, -1))
            p, q = rel
            rows_kl.append((p * (p.log() - q.log())).sum(-1).flatten())  # [H * n_b]
        total = total + torch.cat(rows_kl).mean()
    return total


@pytest.mark.parametrize("masked", [False, True])
def test_attention_relation_loss_matches_float64_reference_across_widths(gen, masked):
    # Teacher with 8 q-heads x 8 and GQA k/v of width 32; student narrower: width 32 and k/v 16.
    b, n, heads = 2, 7, 4
    teacher = {"q": torch.randn(b, n, 64, generator=gen), "k": torch.randn(b, n, 32, generator=gen),
               "v": torch.randn(b, n, 32, generator=gen)}
    student = {"q": torch.randn(b, n, 32, generator=gen), "k": torch.randn(b, n, 16, generator=gen),
               "v": torch.randn(b, n, 16, generator=gen)}
    mask = None
    if masked:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[1, -3:] = False
    value = attention_relation_loss(teacher, student, heads, 1.3, mask)
    ref = _ref_attention(teacher, student, heads, 1.3, mask)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-7)
    for key in "qkv":
        def f(x, key=key):
            return attention_relation_loss(teacher, {**student, key: x}, heads, 1.3, mask)

        def fr(x, key=key):
            return _ref_attention(teacher, {**student, key: x}, heads, 1.3, mask)

        _, g = _grad(f, student[key])
        _, rg = _grad(fr, student[key].double())
        torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-8)


def test_attention_relation_loss_zero_for_identical_states_and_width_check(gen):
    states = {k: torch.randn(1, 5, 24, generator=gen) for k in "qkv"}
    assert attention_relation_loss(states, states, 4).abs() < 1e-6
    with pytest.raises(ValueError, match="divisible"):
        attention_relation_loss(states, states, 5)


def test_bitdistill_loss_combines_components_with_their_weights(gen):
    vocab, tau = 48, 5.0
    t, s = torch.randn(2, 6, vocab, generator=gen) * 3, torch.randn(2, 6, vocab, generator=gen) * 3
    labels = _labels(2, 6, vocab, gen)
    targets = _sparse_from_dense(t, 8, tau)
    tq = {k: torch.randn(2, 6, 16, generator=gen) for k in "qkv"}
    sq = {k: torch.randn(2, 6, 16, generator=gen) for k in "qkv"}
    w = LossWeights(ce_weight=0.7, logits_weight=10.0, attention_weight=1e3, temperature=tau, split_heads=2)
    out = bitdistill_loss(s, labels, w, targets, tq, sq)
    ce = cross_entropy(s, labels)
    kl = sparse_kl(s, targets, labels, tau)
    ad = attention_relation_loss(tq, sq, 2)
    torch.testing.assert_close(out.total, 0.7 * ce + 10.0 * kl + 1e3 * ad)
    torch.testing.assert_close(out.logits_kl, kl)
    with pytest.raises(ValueError, match="Q/K/V"):
        bitdistill_loss(s, labels, w, targets)
    ce_only = bitdistill_loss(s, labels, LossWeights(logits_weight=0.0, attention_weight=0.0))
    torch.testing.assert_close(ce_only.total, ce)
