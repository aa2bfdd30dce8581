"""Teacher targets in four forms behind one API, and how a teacher builds them from raw logits.

- `DenseTargets`: the teacher's raw logits; the loss applies tau to them.
- `HiddenTargets`: the teacher's final hidden states (the input of its output head) and a frozen
  copy of that head; the loss rebuilds the raw logits chunk by chunk, so the KL is exact (dense) at
  hidden_size * 2 bytes per token on the wire, and no [tokens, vocab] teacher tensor ever exists.
- `SparseTargets`: top-k log-probabilities at tau plus the tail mass (everything else, one class).
- `SampledTargets`: ids drawn with replacement from the teacher distribution at tau, with weights
  count / draws and the teacher's log-probabilities at those ids ("Sparse Logit Sampling",
  Anshumann et al. 2025). sum_j w_j (log p_j - log q_j) is an unbiased estimate of KL(p || q), and
  its gradient w.r.t. the student logits is an unbiased estimate of the dense one.

Sparse and sampled targets carry the temperature the teacher applied, so the loss can refuse a
second application. Shapes: leading dims [B, T] (or [N]), then k where the form has one.
"""

from dataclasses import Field, dataclass, fields, replace
from typing import Any, ClassVar, Dict, Optional, Union

import torch
import torch.nn.functional as F


def _check_finite(targets, names) -> None:
    for name in names:
        value = getattr(targets, name)
        bad = ~torch.isfinite(value.float()) if value.is_floating_point() else None
        if bad is not None and bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise ValueError(f"teacher targets '{name}' hold {int(bad.sum())} NaN/inf values "
                             f"(first at index {first}: {value[first].item()})")


class _Rows:
    """Row slicing over the flattened leading dims, shared by every target form."""

    __dataclass_fields__: ClassVar[Dict[str, "Field[Any]"]]  # every subclass is a @dataclass

    def flat(self):
        lead = self.lead_ndim()
        return replace(self, **{f.name: _flatten(getattr(self, f.name), lead) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def rows(self, sl: slice):
        return replace(self, **{f.name: getattr(self, f.name)[sl] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def _flatten(value: torch.Tensor, lead: int) -> torch.Tensor:
    return value.reshape(-1, *value.shape[lead:])


@dataclass
class DenseTargets(_Rows):
    logits: torch.Tensor  # [B, T, V] raw teacher logits

    temperature: Optional[float] = None  # dense logits are raw: the loss applies tau

    def lead_ndim(self) -> int:
        return self.logits.dim() - 1

    def validate(self) -> "DenseTargets":
        _check_finite(self, ["logits"])
        return self


class OutputHead:
    """A frozen copy of a teacher's output head: raw logits = softcap(scale * h W^T + b)[:vocab].
    In bf16 on a GPU (`to(device, torch.bfloat16)`): in fp32 its matmul alone would cost ~10 TFLOP
    per step at a 152k vocabulary.

    `scale` and `softcap` cover the heads that do more than a matmul (Cohere's logit_scale, Gemma's
    final_logit_softcapping); Llama, Qwen and SmolLM2 use neither. Not a tensor field of the targets,
    so slicing targets by rows leaves it whole."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, scale: float = 1.0,
                 softcap: Optional[float] = None, vocab_size: Optional[int] = None):
        vocab_size = vocab_size or weight.shape[0]
        self.weight = weight[:vocab_size].float().contiguous()
        self.bias = bias[:vocab_size].float() if bias is not None else None
        self.scale, self.softcap = float(scale), softcap

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "OutputHead":
        """On `device`, its matmul in `dtype` (training's autocast dtype; fp32 when not given)."""
        self.weight = self.weight.to(device, dtype)
        self.bias = self.bias.to(device, dtype) if self.bias is not None else None
        return self

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw logits in fp32 (the softmax statistics need it), the matmul in the weight's dtype."""
        logits = F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass
class HiddenTargets(_Rows):
    hidden: torch.Tensor  # [B, T, H] the teacher's final hidden states (after its final norm)
    head: OutputHead  # frozen copy of the teacher's output head

    temperature: Optional[float] = None  # raw, like dense logits: the loss applies tau

    def lead_ndim(self) -> int:
        return self.hidden.dim() - 1

    def validate(self) -> "HiddenTargets":
        _check_finite(self, ["hidden"])
        if self.hidden.shape[-1] != self.head.weight.shape[1]:
            raise ValueError(f"teacher hidden states have width {self.hidden.shape[-1]} but its output head "
                             f"expects {self.head.weight.shape[1]}")
        return self

    def raw_logits(self) -> torch.Tensor:
        """Raw teacher logits of these rows (materialise only a chunk's worth)."""
        return self.head(self.hidden.to(self.head.weight.device))


@dataclass
class SparseTargets(_Rows):
    ids: torch.Tensor  # [B, T, k] int
    logprobs: torch.Tensor  # [B, T, k] log_softmax(teacher_logits / tau) at ids
    tail_mass: torch.Tensor  # [B, T] 1 - sum(exp(logprobs))
    temperature: float

    def lead_ndim(self) -> int:
        return self.tail_mass.dim()

    def validate(self) -> "SparseTargets":
        _check_finite(self, ["logprobs", "tail_mass"])
        return self


@dataclass
class SampledTargets(_Rows):
    ids: torch.Tensor  # [B, T, k] int, distinct per position (padding slots have weight 0)
    weights: torch.Tensor  # [B, T, k] count / draws, summing to 1 per position
    logprobs: torch.Tensor  # [B, T, k] teacher log-probabilities at tau at ids
    temperature: float

    def lead_ndim(self) -> int:
        return self.ids.dim() - 1

    def validate(self) -> "SampledTargets":
        _check_finite(self, ["weights", "logprobs"])
        return self


Targets = Union[DenseTargets, HiddenTargets, SparseTargets, SampledTargets]


def tail_mass(top_logprobs: torch.Tensor) -> torch.Tensor:
    """1 - sum(exp(top_logprobs)) over the last dim, as -expm1(logsumexp): no 1 - sum cancellation."""
    return (-torch.expm1(torch.logsumexp(top_logprobs.float(), dim=-1))).clamp(min=0.0)


def sparse_targets(teacher_logits: torch.Tensor, k: int, temperature: float) -> SparseTargets:
    logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    top = logprobs.topk(k, dim=-1)
    return SparseTargets(ids=top.indices, logprobs=top.values, tail_mass=tail_mass(top.values),
                         temperature=temperature)


def sampled_targets(teacher_logits: torch.Tensor, draws: int, temperature: float,
                    generator: Optional[torch.Generator] = None) -> SampledTargets:
    """`draws` ids per position from softmax(logits / tau), merged into distinct ids with weights."""
    logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    lead, vocab = logprobs.shape[:-1], logprobs.shape[-1]
    flat = logprobs.reshape(-1, vocab)
    drawn = torch.multinomial(flat.exp(), draws, replacement=True, generator=generator)  # [N, draws]
    drawn, _ = drawn.sort(dim=-1)
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    # Count each distinct id once at its first slot; repeated slots keep the id with weight 0.
    slot_group = first.cumsum(-1) - 1
    ones = torch.ones_like(drawn, dtype=torch.float32)
    counts = torch.zeros_like(ones).scatter_add_(-1, slot_group, ones)
    weights = torch.where(first, counts.gather(-1, slot_group), torch.zeros_like(counts)) / draws
    return SampledTargets(ids=drawn.reshape(*lead, draws), weights=weights.reshape(*lead, draws),
                          logprobs=flat.gather(-1, drawn).reshape(*lead, draws), temperature=temperature)
