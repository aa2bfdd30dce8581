"""Cross-entropy and logits distillation L_LD = KL(P_teacher || P_student) at temperature tau.

Shapes: student logits [B, T, V]; labels [B, T] already aligned with the logits (labels[t] is the
token after position t), IGNORE_INDEX where there is none. Every loss is a mean over the positions
that carry a label, never a sum over the sequence, so its size does not grow with sequence length.
L_LD is multiplied by tau^2 when `temperature_squared` (the default, as the official code does; the
paper's equation omits it) so its gradient scale does not shrink as tau grows.

`logit_losses` is the training path: CE and L_LD in one pass over chunks of tokens, with their
gradients written analytically (see chunking.py), so no full [tokens, vocab] fp32 copy of either side
ever exists and each chunk needs two temporaries. Given the student's hidden states and output head
(`HeadInputs`, what training passes) it computes each chunk's logits itself, so the student's
[tokens, vocab] logits never exist at all (student_logits.py).
`kl_per_token` / `logits_kl` are the plain autograd versions, kept as the readable definition.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from distillation.data.packing import IGNORE_INDEX  # where labels are made (torch-free, for the data processes)
from distillation.losses.chunking import attach_grad
from distillation.losses.student_logits import HeadInputs, logit_source
from distillation.losses.targets import DenseTargets, HiddenTargets, SampledTargets, SparseTargets, Targets

DEFAULT_CHUNK_TOKENS = 512


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def _check_temperature(targets: Targets, temperature: float) -> None:
    if targets.temperature is not None and abs(targets.temperature - temperature) > 1e-6:
        raise ValueError(f"teacher targets were computed at temperature {targets.temperature}, "
                         f"but the loss uses {temperature}; temperature must be applied exactly once")


def kl_per_token(student_logits: torch.Tensor, targets: Targets, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at each position, in fp32, for any target form. Shapes [..., V] -> [...]."""
    s_lp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(targets, (DenseTargets, HiddenTargets)):
        t_lp = F.log_softmax(_raw_logits(targets).float() / temperature, dim=-1)
        return (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    ids = targets.ids.long()
    s_at = s_lp.gather(-1, ids)
    t_at = targets.logprobs.float()
    if isinstance(targets, SampledTargets):
        weights = targets.weights.float()
        return (weights * (t_at - s_at)).sum(-1)
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"unknown teacher target type {type(targets).__name__}")
    # k + 1 classes: the top-k ids and one tail bucket holding every other id. The student's tail is
    # an exact log-sum-exp over the ids outside the top-k (no 1 - sum cancellation); the teacher side
    # is renormalised over the k + 1 buckets, which absorbs fp16 rounding of its log-probabilities.
    floor = torch.finfo(s_lp.dtype).min  # finite, so an all-masked row (k == V) has no NaN gradient
    s_tail = torch.logsumexp(s_lp.scatter(-1, ids, floor), dim=-1)
    p_top, p_tail = _sparse_teacher(targets, student_logits.shape[-1])
    kl_top = (p_top * (p_top.clamp(min=1e-30).log() - s_at)).sum(-1)
    kl_tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=1e-30).log() - s_tail), torch.zeros_like(p_tail))
    return kl_top + kl_tail


def logits_kl(student_logits: torch.Tensor, targets: Targets, labels: torch.Tensor, temperature: float,
              temperature_squared: bool = True) -> torch.Tensor:
    """Unchunked L_LD: masked mean of `kl_per_token`, times tau^2 when asked."""
    _check_temperature(targets, temperature)
    mask = (labels != IGNORE_INDEX).float()
    per_token = kl_per_token(student_logits, targets, temperature)
    scale = temperature**2 if temperature_squared else 1.0
    return scale * (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def logit_losses(student: Union[torch.Tensor, HeadInputs], labels: torch.Tensor, targets: Optional[Targets] = None,
                 temperature: float = 1.0, temperature_squared: bool = True, ce_weight: float = 1.0,
                 kl_weight: float = 1.0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, n_labels: Optional[float] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_weight * CE + kl_weight * L_LD, CE, L_LD), chunked over tokens. `student`: its logits, or
    its final hidden states and output head (`HeadInputs`), which the training step passes.

    Only the weighted total carries a gradient (the components are for logging); it equals the
    gradient of the unchunked losses. The means divide by `n_labels`, by default this batch's
    labelled tokens; training passes the optimizer step's labelled tokens per micro-batch, so that
    every token of a step weighs the same however the labels fall (training/step.py).
    """
    if kl_weight and targets is None:
        raise ValueError("kl_weight > 0 needs teacher targets")
    if targets is not None:
        _check_temperature(targets, temperature)
        targets.validate()
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    scale = temperature**2 if temperature_squared else 1.0
    source = logit_source(student)
    flat_labels = labels.reshape(-1)
    flat_targets = targets.flat() if targets is not None else None
    denominator = (flat_labels != IGNORE_INDEX).sum().clamp(min=1).float() if n_labels is None else max(n_labels, 1.0)
    want_grad = source.requires_grad and torch.is_grad_enabled()
    chunk_fns = _COMPILED if labels.device.type == "cuda" else (_ce_chunk, _kl_chunk)
    if want_grad:
        source.start_grad()
    ce_sum = torch.zeros((), dtype=torch.float32, device=labels.device)
    kl_sum = torch.zeros((), dtype=torch.float32, device=labels.device)
    for start in range(0, flat_labels.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        x = source.chunk(rows)
        row_weight = (flat_labels[rows] != IGNORE_INDEX).float() / denominator  # masked mean, per row
        chunk_grad = source.chunk_grad(rows, x) if want_grad else None
        if ce_weight:
            ce, ce_grad = chunk_fns[0](x, flat_labels[rows], row_weight, want_grad)
            ce_sum += ce
            if chunk_grad is not None:
                chunk_grad.add_(ce_grad.mul_((ce_weight * row_weight)[:, None]))
            del ce_grad
        if kl_weight:
            assert flat_targets is not None  # kl_weight without targets was rejected above
            kl, kl_grad = chunk_fns[1](x, flat_targets.rows(rows), temperature, want_grad)
            kl_sum += scale * (kl * row_weight).sum()
            if chunk_grad is not None:
                chunk_grad.add_(kl_grad.mul_((kl_weight * scale / temperature * row_weight)[:, None]))
            del kl_grad
        if chunk_grad is not None:
            source.put_grad(rows, chunk_grad)
    total = ce_weight * ce_sum + kl_weight * kl_sum
    if want_grad:
        total = attach_grad(total, source.inputs, source.grads())
    return total, ce_sum, kl_sum


def _ce_chunk(x, labels, row_weight, want_grad):
    """Masked CE of one chunk (weighted by row) and d(CE_token)/dx = softmax(x) - onehot(label)."""
    safe = labels.clamp(min=0)[:, None]
    lse = torch.logsumexp(x, dim=-1)
    value = ((lse - x.gather(-1, safe)[:, 0]) * row_weight).sum()
    if not want_grad:
        return value, None
    probs = (x - lse[:, None]).exp_()
    return value, probs.scatter_add_(-1, safe, torch.full(safe.shape, -1.0, device=x.device))


def _kl_chunk(x, targets, temperature, want_grad):
    """Per-token KL(teacher || student) of one chunk and its gradient w.r.t. x / tau, analytically:
    q - p for dense and sampled targets; for top-k + tail, q_i - p_i on the top ids and
    q_v * (1 - p_tail / q_tail) elsewhere. Two [chunk, V] temporaries instead of autograd's many."""
    q = x.div(temperature)
    lse = torch.logsumexp(q, dim=-1, keepdim=True)
    q.sub_(lse).exp_()  # the student's softmax at tau
    lse = lse[:, 0]
    if isinstance(targets, (DenseTargets, HiddenTargets)):
        t_lp = F.log_softmax(_raw_logits(targets).float() / temperature, dim=-1)
        p = t_lp.exp()
        kl = (p * t_lp).sum(-1) - (p * x).sum(-1) / temperature + lse
        return kl, q.sub_(p) if want_grad else None
    ids = targets.ids.long()
    s_at = x.gather(-1, ids) / temperature - lse[:, None]
    if isinstance(targets, SampledTargets):
        weights = targets.weights.float()
        kl = (weights * (targets.logprobs.float() - s_at)).sum(-1)
        if want_grad:
            q.mul_(weights.sum(-1, keepdim=True)).scatter_add_(-1, ids, -weights)
        return kl, q if want_grad else None
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"unknown teacher target type {type(targets).__name__}")
    p_top, p_tail = _sparse_teacher(targets, x.shape[-1])
    q_top = q.gather(-1, ids)
    q.scatter_(-1, ids, 0.0)
    q_tail = q.sum(-1)  # exact mass outside the top-k (no 1 - sum cancellation)
    kl = (p_top * (p_top.clamp(min=1e-30).log() - s_at)).sum(-1)
    kl = kl + torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=1e-30).log() - q_tail.clamp(min=1e-38).log()),
                          torch.zeros_like(p_tail))
    if not want_grad:
        return kl, None
    factor = torch.where(q_tail > 0, 1 - p_tail / q_tail.clamp(min=1e-38), torch.ones_like(q_tail))
    q.mul_(factor[:, None]).scatter_(-1, ids, q_top - p_top)
    return kl, q


def _raw_logits(targets) -> torch.Tensor:
    """Dense targets' logits, or the logits the teacher's head gives its hidden states (this chunk only)."""
    return targets.raw_logits() if isinstance(targets, HiddenTargets) else targets.logits


def _sparse_teacher(targets: SparseTargets, vocab: int):
    """Teacher probabilities on the top ids and in the tail, renormalised over the k + 1 buckets
    (which absorbs fp16 rounding of the log-probabilities)."""
    p_top = targets.logprobs.float().exp()
    tail = targets.tail_mass.float().clamp(min=0.0)
    if targets.ids.shape[-1] >= vocab:
        tail = torch.zeros_like(tail)  # no id outside the top-k: a nonzero tail is rounding noise
    norm = p_top.sum(-1) + tail
    return p_top / norm[..., None], tail / norm


# On a GPU, compiled where `student.compile` is on (experiment=gpu), as Liger's chunked losses are:
# the softmax statistics and the gradient's elementwise runs fuse into generated kernels.
# `student.build.set_compile(False)` holds them eager; on CPU they always are (as attention.py).
_COMPILED = (torch.compile(_ce_chunk), torch.compile(_kl_chunk))
