"""L = ce_weight * CE + lambda * L_LD + gamma * L_AD, returning the total and every component."""

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from distillation.losses.attention import attention_relation_loss
from distillation.losses.logits import SparseTargets, cross_entropy, sparse_kl


@dataclass(frozen=True)
class LossWeights:
    ce_weight: float = 1.0
    logits_weight: float = 10.0
    attention_weight: float = 1.0e5
    temperature: float = 5.0
    temperature_squared: bool = True
    split_heads: int = 32
    attention_temperature: float = 1.0

    @property
    def uses_attention(self) -> bool:
        return self.attention_weight > 0


@dataclass
class LossOutput:
    total: torch.Tensor
    ce: torch.Tensor
    logits_kl: torch.Tensor
    attention: torch.Tensor

    def as_floats(self) -> dict:
        return {"loss": self.total.item(), "ce": self.ce.item(), "logits_kl": self.logits_kl.item(),
                "attention": self.attention.item()}


def bitdistill_loss(student_logits: torch.Tensor, labels: torch.Tensor, weights: LossWeights,
                    targets: Optional[SparseTargets] = None,
                    teacher_qkv: Optional[Mapping[str, torch.Tensor]] = None,
                    student_qkv: Optional[Mapping[str, torch.Tensor]] = None,
                    mask: Optional[torch.Tensor] = None) -> LossOutput:
    zero = student_logits.new_zeros((), dtype=torch.float32)
    ce = cross_entropy(student_logits, labels)
    kl = zero
    if weights.logits_weight > 0:
        if targets is None:
            raise ValueError("logits_weight > 0 needs teacher targets")
        kl = sparse_kl(student_logits, targets, labels, weights.temperature, weights.temperature_squared)
    attn = zero
    if weights.uses_attention:
        if teacher_qkv is None or student_qkv is None:
            raise ValueError("attention_weight > 0 needs teacher and student Q/K/V states")
        attn = attention_relation_loss(teacher_qkv, student_qkv, weights.split_heads,
                                       weights.attention_temperature, mask)
    total = weights.ce_weight * ce + weights.logits_weight * kl + weights.attention_weight * attn
    return LossOutput(total=total, ce=ce, logits_kl=kl, attention=attn)
