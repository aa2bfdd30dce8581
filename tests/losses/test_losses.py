"""Every loss against an independent float64 reference on fresh random inputs: values and gradients."""

import pytest
import torch

from distillation.losses import (
    IGNORE_INDEX,
    DenseTargets,
    HeadInputs,
    HiddenTargets,
    OutputHead,
    attention_relation_loss,
    bitdistill_loss,
    cross_entropy,
    logit_losses,
    logits_kl,
    sampled_targets,
    sparse_targets,
)
from distillation.training.plan import loss_weights

RTOL = 1e-5  # fp32 against float64, relative


def _labels(batch, length, vocab, gen):
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, -1] = IGNORE_INDEX
    labels[0, 1] = IGNORE_INDEX  # a masked position inside a row, too
    return labels


def _mask(labels):
    return (labels != IGNORE_INDEX).double()


def _ref_ce(s, labels):
    lp = torch.log_softmax(s.double(), -1)
    picked = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(picked * _mask(labels)).sum() / _mask(labels).sum()


def _ref_dense_kl(t, s, labels, tau, squared=True):
    """sum_v p log(p / q) in float64 with explicit softmax, masked mean over labelled positions."""
    p = torch.softmax(t.double() / tau, -1)
    q = torch.softmax(s.double() / tau, -1)
    per = (p * (p.log() - q.log())).sum(-1)
    return (tau**2 if squared else 1.0) * (per * _mask(labels)).sum() / _mask(labels).sum()


def _ref_sparse_kl(t, s, ids, labels, tau):
    """KL over the top-k ids plus one bucket for everything else, from the full teacher distribution."""
    p = torch.softmax(t.double() / tau, -1)
    q = torch.softmax(s.double() / tau, -1)
    p_top, q_top = p.gather(-1, ids.long()), q.gather(-1, ids.long())
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    per = (p_top * (p_top.log() - q_top.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    return tau**2 * (per * _mask(labels)).sum() / _mask(labels).sum()


def _ref_sampled_kl(t, s, targets, labels, tau):
    p_log = torch.log_softmax(t.double() / tau, -1).gather(-1, targets.ids.long())
    q_log = torch.log_softmax(s.double() / tau, -1).gather(-1, targets.ids.long())
    per = (targets.weights.double() * (p_log - q_log)).sum(-1)
    return tau**2 * (per * _mask(labels)).sum() / _mask(labels).sum()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (g,) = torch.autograd.grad(value, x)
    return value.detach(), g


def _close(value, grad, ref_value, ref_grad):
    """Value within RTOL relative; gradient within RTOL relative in norm (single entries near zero
    carry fp32 cancellation error far below the gradient's scale)."""
    torch.testing.assert_close(value.double(), ref_value, rtol=RTOL, atol=1e-7)
    _grad_close(grad, ref_grad)


def _grad_close(grad, ref_grad, tol=RTOL):
    err = ((grad.double() - ref_grad).norm() / ref_grad.norm()).item()
    assert err < tol, f"gradient relative error {err:.2e}"


def test_cross_entropy_matches_float64_reference(gen):
    s = torch.randn(3, 7, 50, generator=gen) * 3
    labels = _labels(3, 7, 50, gen)
    _close(*_grad(lambda x: cross_entropy(x, labels), s), *_grad(lambda x: _ref_ce(x, labels), s.double()))
    _close(*_grad(lambda x: logit_losses(x, labels, kl_weight=0.0, chunk_tokens=4)[0], s),
           *_grad(lambda x: _ref_ce(x, labels), s.double()))


@pytest.mark.parametrize("tau,squared", [(1.0, True), (5.0, True), (2.0, False)])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_dense_kl_matches_float64_reference(gen, tau, squared, chunk):
    t, s = torch.randn(2, 9, 40, generator=gen) * 4, torch.randn(2, 9, 40, generator=gen) * 4
    labels = _labels(2, 9, 40, gen)
    ref = _grad(lambda x: _ref_dense_kl(t, x, labels, tau, squared), s.double())
    _close(*_grad(lambda x: logits_kl(x, DenseTargets(t), labels, tau, squared), s), *ref)
    _close(*_grad(lambda x: logit_losses(x, labels, DenseTargets(t), tau, squared, ce_weight=0.0,
                                         chunk_tokens=chunk)[0], s), *ref)


@pytest.mark.parametrize("k", [1, 5, 31])
def test_sparse_kl_matches_float64_topk_plus_tail_reference(gen, k):
    vocab, tau = 64, 5.0
    t, s = torch.randn(2, 6, vocab, generator=gen) * 6, torch.randn(2, 6, vocab, generator=gen) * 6
    labels = _labels(2, 6, vocab, gen)
    targets = sparse_targets(t.double(), k, tau)
    ref = _grad(lambda x: _ref_sparse_kl(t, x, targets.ids, labels, tau), s.double())
    _close(*_grad(lambda x: logits_kl(x, targets, labels, tau), s), *ref)
    _close(*_grad(lambda x: logit_losses(x, labels, targets, tau, ce_weight=0.0, chunk_tokens=4)[0], s), *ref)


@pytest.mark.parametrize("head_kind", ["plain", "bias+scale+softcap"])
@pytest.mark.parametrize("chunk", [3, 1000])
def test_hidden_state_kl_matches_float64_dense_reference_through_the_teachers_head(gen, head_kind, chunk):
    # The teacher sends hidden states [B, T, H]; the loss rebuilds raw logits with the head's weights
    # (cut to the shared vocabulary), so its KL is the dense one on those logits, values and gradients.
    b, n, width, vocab, tau = 2, 5, 16, 40, 2.0
    hidden = torch.randn(b, n, width, generator=gen)
    weight = torch.randn(vocab + 8, width, generator=gen) * 0.5  # padded rows past the real vocabulary
    extra = {}
    if head_kind != "plain":
        extra = {"bias": torch.randn(vocab + 8, generator=gen), "scale": 0.7, "softcap": 4.0}
    head = OutputHead(weight, vocab_size=vocab, **extra)
    t = hidden.double() @ weight[:vocab].double().T  # the raw teacher logits, by hand
    if head_kind != "plain":
        t = torch.tanh((t + extra["bias"][:vocab].double()) * 0.7 / 4.0) * 4.0
    s = torch.randn(b, n, vocab, generator=gen) * 2
    labels = _labels(b, n, vocab, gen)
    targets = HiddenTargets(hidden=hidden, head=head)

    def f(x):
        return logit_losses(x, labels, targets, tau, True, 0.0, 1.0, chunk)[0]

    _close(*_grad(f, s), *_grad(lambda x: _ref_dense_kl(t, x, labels, tau), s.double()))
    torch.testing.assert_close(logits_kl(s, targets, labels, tau).double(), _ref_dense_kl(t, s, labels, tau),
                               rtol=RTOL, atol=1e-7)
    with pytest.raises(ValueError, match="width 16 but its output head expects 12"):
        logit_losses(s, labels, HiddenTargets(hidden=hidden, head=OutputHead(weight[:, :12])), tau)


def test_sparse_kl_with_full_vocabulary_equals_dense_kl(gen):
    vocab, tau = 32, 2.0
    t, s = torch.randn(2, 5, vocab, generator=gen) * 3, torch.randn(2, 5, vocab, generator=gen) * 3
    labels = _labels(2, 5, vocab, gen)
    value, grad = _grad(lambda x: logit_losses(x, labels, sparse_targets(t, vocab, tau), tau, ce_weight=0.0)[0], s)
    assert torch.isfinite(grad).all()
    _close(value, grad, *_grad(lambda x: _ref_dense_kl(t, x, labels, tau), s.double()))


def test_sampled_kl_matches_its_float64_reference(gen):
    vocab, tau = 40, 2.0
    t, s = torch.randn(2, 6, vocab, generator=gen) * 3, torch.randn(2, 6, vocab, generator=gen) * 3
    labels = _labels(2, 6, vocab, gen)
    targets = sampled_targets(t, 12, tau, generator=gen)
    torch.testing.assert_close(targets.weights.sum(-1), torch.ones(2, 6))
    ref = _grad(lambda x: _ref_sampled_kl(t, x, targets, labels, tau), s.double())
    _close(*_grad(lambda x: logit_losses(x, labels, targets, tau, ce_weight=0.0, chunk_tokens=3)[0], s), *ref)


def test_sampled_estimator_mean_converges_to_the_dense_value_and_gradient(gen):
    vocab, tau, trials = 24, 2.0, 4000
    t, s = torch.randn(1, 3, vocab, generator=gen) * 2, torch.randn(1, 3, vocab, generator=gen) * 2
    labels = torch.randint(0, vocab, (1, 3), generator=gen)
    dense_value, dense_grad = _grad(lambda x: _ref_dense_kl(t, x, labels, tau), s.double())
    # Many independent draws at once: rows of one big batch share the student and teacher logits.
    big_t, big_s = t.expand(trials, -1, -1), s.expand(trials, -1, -1)
    targets = sampled_targets(big_t, 8, tau, generator=gen)
    value, grad = _grad(lambda x: logits_kl(x, targets, labels.expand(trials, -1), tau), big_s.contiguous())
    mean_grad = grad.sum(0, keepdim=True).double()  # the loss is a mean over rows: sum = per-row mean
    assert abs(value.item() - dense_value.item()) < 0.05 * dense_value.item() + 0.02
    err = (mean_grad - dense_grad).norm() / dense_grad.norm()
    assert err < 0.05, f"relative gradient error {err:.3f}"


def test_chunked_equals_unchunked_for_the_combined_logit_losses(gen):
    vocab, tau = 50, 5.0
    t, s = torch.randn(3, 8, vocab, generator=gen) * 3, torch.randn(3, 8, vocab, generator=gen) * 3
    labels = _labels(3, 8, vocab, gen)
    targets = sparse_targets(t, 7, tau)
    one = _grad(lambda x: logit_losses(x, labels, targets, tau, ce_weight=0.7, kl_weight=10.0, chunk_tokens=10**6)[0], s)
    many = _grad(lambda x: logit_losses(x, labels, targets, tau, ce_weight=0.7, kl_weight=10.0, chunk_tokens=3)[0], s)
    torch.testing.assert_close(many[0], one[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(many[1], one[1], rtol=1e-5, atol=1e-9)
    ref = _grad(lambda x: 0.7 * _ref_ce(x, labels) + 10.0 * _ref_sparse_kl(t, x, targets.ids, labels, tau), s.double())
    _close(*many, *ref)


def test_chunked_loss_keeps_the_logits_dtype_for_its_gradient(gen):
    s = (torch.randn(2, 4, 30, generator=gen) * 2).to(torch.bfloat16).requires_grad_()
    labels = _labels(2, 4, 30, gen)
    total, ce, kl = logit_losses(s, labels, DenseTargets(torch.randn(2, 4, 30, generator=gen)), 2.0, chunk_tokens=3)
    total.backward()
    assert s.grad.dtype == torch.bfloat16 and total.dtype == torch.float32
    assert not ce.requires_grad and not kl.requires_grad


def _fused_case(gen, kind, vocab=40, width=16):
    """Hidden states, a padded student head with a bias, labels and a teacher of each target kind,
    with its float64 reference loss of the student's logits."""
    b, n, tau = 2, 5, 2.0
    hidden = torch.randn(b, n, width, generator=gen)
    weight, bias = torch.randn(vocab + 8, width, generator=gen) * 0.5, torch.randn(vocab + 8, generator=gen)
    labels = _labels(b, n, vocab, gen)
    t = torch.randn(b, n, vocab, generator=gen) * 3
    targets = {"dense": DenseTargets(t), "topk": sparse_targets(t, 7, tau),
               "sampled": sampled_targets(t, 12, tau, generator=gen)}.get(kind)
    if kind == "hidden":
        t_hidden = torch.randn(b, n, width, generator=gen)
        t = t_hidden.double() @ weight[:vocab].double().T * 0.9
        targets = HiddenTargets(hidden=t_hidden, head=OutputHead(weight * 0.9, vocab_size=vocab))
    kl_ref = {"dense": _ref_dense_kl, "hidden": _ref_dense_kl,
              "topk": lambda t, s, labels, tau: _ref_sparse_kl(t, s, targets.ids, labels, tau),
              "sampled": lambda t, s, labels, tau: _ref_sampled_kl(t, s, targets, labels, tau)}[kind]

    def reference(h, w, b_):
        s = h @ w[:vocab].T + b_[:vocab]
        return 0.7 * _ref_ce(s, labels) + 10.0 * kl_ref(t, s, labels, tau)
    return (hidden, weight, bias), labels, targets, tau, vocab, reference


@pytest.mark.parametrize("kind", ["dense", "hidden", "topk", "sampled"])
@pytest.mark.parametrize("chunk", [3, 1000])
def test_the_loss_fused_with_the_students_head_matches_float64_reference(gen, kind, chunk):
    """Hidden states and head in, logits one chunk at a time: CE + lambda * KL and the gradients of
    the hidden states, the head's weight (none past the shared vocabulary) and bias, for every
    target kind, equal the float64 loss of the full logits."""
    inputs, labels, targets, tau, vocab, reference = _fused_case(gen, kind)
    leaves = [x.clone().requires_grad_() for x in inputs]
    total, ce, kl = logit_losses(HeadInputs(*leaves, vocab_size=vocab), labels, targets, tau, True, 0.7, 10.0, chunk)
    grads = torch.autograd.grad(total, leaves)
    ref_leaves = [x.double().requires_grad_() for x in inputs]
    ref_total = reference(*ref_leaves)
    ref_grads = torch.autograd.grad(ref_total, ref_leaves)
    torch.testing.assert_close(total.double(), ref_total, rtol=RTOL, atol=1e-7)
    for grad, ref in zip(grads, ref_grads):
        _grad_close(grad, ref)
    assert (grads[1][vocab:] == 0).all() and (grads[2][vocab:] == 0).all()
    dense = logit_losses(inputs[0] @ inputs[1][:vocab].T + inputs[2][:vocab], labels, targets, tau, True, 0.7, 10.0, chunk)
    torch.testing.assert_close(torch.stack([ce, kl]), torch.stack(dense[1:]), rtol=1e-5, atol=1e-6)


def test_the_fused_loss_in_bfloat16_keeps_fp32_statistics_and_each_inputs_dtype(gen):
    """On a GPU the head's matmuls run in the autocast dtype: the loss stays within bf16 rounding of
    the fp32 one, its value is fp32, and each gradient has its input's dtype."""
    inputs, labels, targets, tau, vocab, _ = _fused_case(gen, "topk")
    exact = logit_losses(HeadInputs(*inputs, vocab_size=vocab), labels, targets, tau, True, 0.7, 10.0)[0]
    leaves = [x.clone().requires_grad_() for x in inputs]
    total = logit_losses(HeadInputs(*leaves, vocab_size=vocab, dtype=torch.bfloat16), labels, targets, tau, True, 0.7,
                         10.0)[0]
    total.backward()
    assert total.dtype == torch.float32 and all(x.grad.dtype == torch.float32 for x in leaves)
    torch.testing.assert_close(total, exact, rtol=2e-2, atol=2e-2)
    teacher_head = OutputHead(inputs[1], vocab_size=vocab)  # the teacher's side: its head in bf16, logits fp32
    logits = OutputHead(inputs[1], vocab_size=vocab).to("cpu", torch.bfloat16)(inputs[0])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, teacher_head(inputs[0]), rtol=2e-2, atol=5e-2)


def test_the_compiled_chunk_functions_a_gpu_runs_equal_the_eager_ones(gen):
    """On a GPU with `student.compile` each chunk's CE and KL (value and gradient) run compiled; here
    on CPU the same compiled functions give the eager results for every target kind."""
    from distillation.losses.logits import _COMPILED, _ce_chunk, _kl_chunk

    (hidden, weight, bias), labels, _, tau, vocab, _ = _fused_case(gen, "dense")
    x = (hidden @ weight[:vocab].T + bias[:vocab]).reshape(-1, vocab)
    flat_labels, row_weight = labels.reshape(-1), torch.rand(x.shape[0], generator=gen)
    pairs = [((_COMPILED[0], _ce_chunk), (flat_labels, row_weight, True))]
    for kind in ("dense", "hidden", "topk", "sampled"):
        targets = _fused_case(gen, kind)[2]
        pairs.append(((_COMPILED[1], _kl_chunk), (targets.flat(), tau, True)))
    for (compiled, eager), rest in pairs:
        (value, grad), (ref_value, ref_grad) = compiled(x.clone(), *rest), eager(x.clone(), *rest)
        torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
        _grad_close(grad, ref_grad)


def test_identical_teacher_and_student_give_zero_and_different_ones_do_not(gen):
    t = torch.randn(1, 4, 30, generator=gen) * 3
    labels = _labels(1, 4, 30, gen)
    for targets in (DenseTargets(t), sparse_targets(t, 8, 3.0)):
        assert logits_kl(t, targets, labels, 3.0).abs() < 1e-5
        assert logits_kl(t + torch.randn(t.shape, generator=gen), targets, labels, 3.0) > 1e-4


def test_temperature_applied_twice_and_nan_targets_are_refused(gen):
    t = torch.randn(1, 3, 10, generator=gen)
    labels = _labels(1, 3, 10, gen)
    with pytest.raises(ValueError, match="temperature must be applied exactly once"):
        logit_losses(t, labels, sparse_targets(t, 4, 5.0), 1.0)
    bad = sparse_targets(t, 4, 5.0)
    bad.logprobs[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'logprobs' hold 1 NaN/inf values \(first at index \(0, 2, 1\)"):
        logit_losses(t, labels, bad, 5.0)
    with pytest.raises(ValueError, match="needs teacher targets"):
        logit_losses(t, labels, None, 5.0)


def test_losses_are_means_not_sums_over_positions(gen):
    t, s = torch.randn(1, 4, 20, generator=gen), torch.randn(1, 4, 20, generator=gen)
    labels = torch.randint(0, 20, (1, 4), generator=gen)
    short = logit_losses(s, labels, DenseTargets(t), 1.0)[0]
    long = logit_losses(s.repeat(1, 8, 1), labels.repeat(1, 8), DenseTargets(t.repeat(1, 8, 1)), 1.0)[0]
    torch.testing.assert_close(short, long)


def _ref_attention(teacher, student, heads, tau, mask, normalization="reference"):
    """Per sequence, only its real tokens: relations among them, mean row KL, summed over q, k, v;
    divided by the relation heads under the official (reference) normalisation
    (tests/losses/test_attention_reference.py pins that one to the official formula)."""
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
    return total / heads if normalization == "reference" else total


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [1, 8])
@pytest.mark.parametrize("norm", ["reference", "paper"])
def test_attention_relation_loss_matches_float64_reference_across_widths(gen, masked, chunk, norm):
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
    value = attention_relation_loss(teacher, student, heads, 1.3, mask, chunk, norm)
    ref = _ref_attention(teacher, student, heads, 1.3, mask, norm)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-7)
    for key in "qkv":
        def f(x, key=key):
            return attention_relation_loss(teacher, {**student, key: x}, heads, 1.3, mask, chunk, norm)

        def fr(x, key=key):
            return _ref_attention(teacher, {**student, key: x}, heads, 1.3, mask, norm)

        _, g = _grad(f, student[key])
        _, rg = _grad(fr, student[key].double())
        _grad_close(g, rg)


def test_attention_relations_with_bfloat16_matmuls_stay_within_its_rounding_of_fp32(gen):
    """On a GPU the relation matmuls run in the autocast dtype: value and gradients within bf16
    rounding of the fp32 loss (whose own reference is the test above), gradients in fp32."""
    teacher = {k: torch.randn(2, 64, 32, generator=gen) for k in "qkv"}
    student = {k: (teacher[k] + 0.5 * torch.randn(2, 64, 32, generator=gen)).requires_grad_() for k in "qkv"}
    exact = attention_relation_loss(teacher, student, 4)
    exact_grads = torch.autograd.grad(exact, list(student.values()))
    fast = attention_relation_loss(teacher, student, 4, dtype=torch.bfloat16)
    fast_grads = torch.autograd.grad(fast, list(student.values()))
    torch.testing.assert_close(fast, exact, rtol=2e-2, atol=0)
    for g, r in zip(fast_grads, exact_grads):
        assert g.dtype == torch.float32
        _grad_close(g, r, tol=5e-2)


def test_the_compiled_relation_loss_a_gpu_runs_equals_the_eager_one(gen):
    """On a GPU with `student.compile` the per-key relation loss runs compiled (generated kernels);
    here on CPU the same compiled function gives the eager value and gradient."""
    from distillation.losses.attention import _key_loss, _key_loss_compiled

    teacher, student = torch.randn(2, 24, 32, generator=gen), torch.randn(2, 24, 32, generator=gen)
    allowed = torch.ones(2, 24, 24, dtype=torch.bool)
    allowed[1, :, -5:] = False
    weight = torch.rand(2, 24, generator=gen)
    args = (teacher, student, 4, 1.0, allowed, weight, torch.float32, True, "q")
    (value, grad), (ref_value, ref_grad) = _key_loss_compiled(*args), _key_loss(*args)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
    _grad_close(grad, ref_grad)


def test_attention_relation_loss_zero_for_identical_states_and_width_check(gen):
    states = {k: torch.randn(1, 5, 24, generator=gen) for k in "qkv"}
    assert attention_relation_loss(states, states, 4).abs() < 1e-6
    with pytest.raises(ValueError, match="teacher q width 24 is not divisible by split_heads=5"):
        attention_relation_loss(states, states, 5)


def test_bitdistill_loss_combines_components_with_their_weights(gen):
    vocab, tau = 48, 5.0
    t, s = torch.randn(2, 6, vocab, generator=gen) * 3, torch.randn(2, 6, vocab, generator=gen) * 3
    labels = _labels(2, 6, vocab, gen)
    targets = sparse_targets(t, 8, tau)
    tq = {k: torch.randn(2, 6, 16, generator=gen) for k in "qkv"}
    sq = {k: torch.randn(2, 6, 16, generator=gen) for k in "qkv"}
    w = loss_weights(ce_weight=0.7, logits_weight=10.0, attention_weight=1e3, temperature=tau, split_heads=2,
                    chunk_tokens=5)

    def total(x, q):
        return bitdistill_loss(x, labels, w, targets, tq, {**sq, "q": q}).total

    def ref(x, q):
        return (0.7 * _ref_ce(x, labels) + 10.0 * _ref_sparse_kl(t, x, targets.ids, labels, tau)
                + 1e3 * _ref_attention(tq, {**sq, "q": q}, 2, 1.0, None))

    s_ = s.clone().requires_grad_()
    q_ = sq["q"].clone().requires_grad_()
    total(s_, q_).backward()
    s64, q64 = s.double().requires_grad_(), sq["q"].double().requires_grad_()
    expected = ref(s64, q64)
    expected.backward()
    torch.testing.assert_close(total(s, sq["q"]).double(), expected.detach(), rtol=RTOL, atol=1e-6)
    _grad_close(s_.grad, s64.grad)
    _grad_close(q_.grad, q64.grad)
    out = bitdistill_loss(s, labels, w, targets, tq, sq)
    torch.testing.assert_close(out.ce, cross_entropy(s, labels))
    torch.testing.assert_close(out.logits_kl, logits_kl(s, targets, labels, tau))
    with pytest.raises(ValueError, match="Q/K/V"):
        bitdistill_loss(s, labels, w, targets)
    ce_only = bitdistill_loss(s, labels, loss_weights(logits_weight=0.0, attention_weight=0.0))
    torch.testing.assert_close(ce_only.total, cross_entropy(s, labels))
