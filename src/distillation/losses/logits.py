"""Cross-entropy and logits distillation L_LD = KL(P_teacher || P_student) at temperature tau.

Shapes: student logits [B, T, V]; labels [B, T] already aligned with the logits (labels[t] is the
token after position t), IGNORE_INDEX where there is none. Every loss is a mean over the positions
that carry a label, never a sum over the sequence, so its size does not grow with sequence length.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class SparseTargets:
    """A teacher distribution per position: top-k log-probabilities plus the mass of everything else.

    `logprobs` were computed by the teacher at `temperature` from raw logits (log_softmax(z / tau));
    `tail_mass` = 1 - sum(exp(logprobs)) is kept as one extra class so the KL stays a divergence.
    """

    ids: torch.Tensor  # [B, T, k] int
    logprobs: torch.Tensor  # [B, T, k] (fp16 on the wire)
    tail_mass: torch.Tensor  # [B, T]
    temperature: float


def _masked_mean(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = (labels != IGNORE_INDEX).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def dense_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float, temperature_squared: bool = True) -> torch.Tensor:
    """KL(softmax(teacher / tau) || softmax(student / tau)), masked mean, optionally times tau^2."""
    s_lp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_lp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    scale = temperature**2 if temperature_squared else 1.0
    return scale * _masked_mean(per_token, labels)


def sparse_kl(student_logits: torch.Tensor, targets: SparseTargets, labels: torch.Tensor,
              temperature: float, temperature_squared: bool = True) -> torch.Tensor:
    """KL over k + 1 classes: the teacher's top-k ids and one tail bucket holding all other ids.

    The student's tail is the exact log-sum-exp over the ids outside the top-k (no 1 - sum
    cancellation). The teacher side is renormalised over the k + 1 buckets, which absorbs fp16
    rounding of its log-probabilities.
    """
    if abs(targets.temperature - temperature) > 1e-6:
        raise ValueError(f"teacher targets were computed at temperature {targets.temperature}, "
                         f"but the loss uses {temperature}; temperature must be applied exactly once")
    ids = targets.ids.long()
    s_lp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = s_lp.gather(-1, ids)
    # A finite fill (not -inf) keeps the backward of an all-masked row (k == vocab) free of NaN.
    floor = torch.finfo(s_lp.dtype).min
    s_tail = torch.logsumexp(s_lp.scatter(-1, ids, floor), dim=-1)

    p_top = targets.logprobs.float().exp()
    tail = targets.tail_mass.float().clamp(min=0.0)
    if ids.shape[-1] >= student_logits.shape[-1]:
        tail = torch.zeros_like(tail)  # no id outside the top-k: a nonzero tail is rounding noise
    norm = p_top.sum(-1) + tail
    p_top = p_top / norm.unsqueeze(-1)
    p_tail = tail / norm
    kl_top = (p_top * (p_top.clamp(min=1e-30).log() - s_top)).sum(-1)
    has_tail = p_tail > 0
    kl_tail = torch.where(has_tail, p_tail * (p_tail.clamp(min=1e-30).log() - s_tail), torch.zeros_like(p_tail))
    scale = temperature**2 if temperature_squared else 1.0
    return scale * _masked_mean(kl_top + kl_tail, labels)
