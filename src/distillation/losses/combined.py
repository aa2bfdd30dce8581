"""L = ce_weight * CE + lambda * L_LD + gamma * L_AD, returning the total and every component."""

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch

from distillation.losses.attention import attention_relation_loss
from distillation.losses.logits import logit_losses
from distillation.losses.student_logits import HeadInputs
from distillation.losses.targets import Targets


@dataclass(frozen=True)
class LossWeights:
    """The loss's settings. No defaults here: they live in the config schema
    (`DistillationConfig`); `training.plan.loss_weights` builds this from it."""

    ce_weight: float
    logits_weight: float  # lambda
    attention_weight: float  # gamma, in the units of `attention_normalization` (losses/attention.py)
    temperature: float
    temperature_squared: bool
    split_heads: int
    attention_temperature: float
    attention_normalization: str
    chunk_tokens: int

    @property
    def uses_attention(self) -> bool:
        return self.attention_weight > 0


LOSS_COMPONENTS = ("loss", "ce", "logits_kl", "attention")  # the keys of LossOutput.as_floats, everywhere


@dataclass
class LossOutput:
    total: torch.Tensor  # differentiable
    ce: torch.Tensor  # the components are detached, for logging
    logits_kl: torch.Tensor
    attention: torch.Tensor

    def as_floats(self) -> dict:
        return dict(zip(LOSS_COMPONENTS, (self.total.item(), self.ce.item(), self.logits_kl.item(),
                                          self.attention.item())))


def bitdistill_loss(student: Union[torch.Tensor, HeadInputs], labels: torch.Tensor, weights: LossWeights,
                    targets: Optional[Targets] = None,
                    teacher_qkv: Optional[Mapping[str, torch.Tensor]] = None,
                    student_qkv: Optional[Mapping[str, torch.Tensor]] = None,
                    mask: Optional[torch.Tensor] = None, segments: Optional[torch.Tensor] = None,
                    n_labels: Optional[float] = None, dtype: torch.dtype = torch.float32) -> LossOutput:
    """`student`: its logits, or its final hidden states and output head (losses/logits.py); `mask`
    [B, T] marks real (non-padding) tokens for the attention relations, `segments` [B, T]
    the document of each token in packed rows (labels already end at document boundaries);
    `n_labels` what CE and L_LD's means divide by (default: the labelled tokens of `labels`); `dtype`
    the relation matmuls' (the autocast dtype; softmax statistics stay fp32)."""
    total, ce, kl = logit_losses(student, labels, targets if weights.logits_weight > 0 else None,
                                 weights.temperature, weights.temperature_squared, weights.ce_weight,
                                 weights.logits_weight, weights.chunk_tokens, n_labels)
    attn = total.new_zeros(())
    if weights.uses_attention:
        if teacher_qkv is None or student_qkv is None:
            raise ValueError("attention_weight > 0 needs teacher and student Q/K/V states")
        attn = attention_relation_loss(teacher_qkv, student_qkv, weights.split_heads,
                                       weights.attention_temperature, mask,
                                       normalization=weights.attention_normalization, segments=segments,
                                       dtype=dtype)
        total = total + weights.attention_weight * attn
    return LossOutput(total=total, ce=ce, logits_kl=kl, attention=attn.detach())
