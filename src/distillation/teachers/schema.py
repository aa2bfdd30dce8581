"""The one message every teacher sends: its logits signal (and optional Q/K/V) as numpy arrays.

Alignment: position t holds the teacher's distribution over token t + 1, exactly like the
student's logits at t. The last position therefore has no label and is masked by the loss.
Three signals: `hidden` (the final hidden states; the student side applies the teacher's output
head, so the distribution is exact and the loss applies tau), or sparse ones whose values are
log_softmax(raw_logits / temperature): there the temperature is applied once, by the teacher, and
travels with the data so the loss can check it matches its own.
On the wire (object store, Ray Data columns) there are no per-token Python objects.
"""

from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import numpy as np

from distillation.losses.attention import QKV

PREFIX = "teacher_"


DTYPES = {"topk_ids": np.int32, "topk_logprobs": np.float16, "tail_mass": np.float32, "temperature": np.float32,
          "sampled_ids": np.int32, "sampled_weights": np.float16, "sampled_logprobs": np.float16,
          "hidden": np.float16, **{key: np.float16 for key in QKV}}


@dataclass
class TeacherOutput:
    """One signal per position: top-k + tail (`topk_*`, `tail_mass`), sampled (`sampled_*`) or `hidden`."""

    temperature: Optional[np.ndarray] = None  # [B] float32: the tau sparse signals applied (per row, rows travel alone)
    topk_ids: Optional[np.ndarray] = None  # [B, T, k] int32
    topk_logprobs: Optional[np.ndarray] = None  # [B, T, k] float16
    tail_mass: Optional[np.ndarray] = None  # [B, T] float32: 1 - sum(exp(topk_logprobs)), the mass outside
    sampled_ids: Optional[np.ndarray] = None  # [B, T, n] int32: draws from the teacher at tau, merged
    sampled_weights: Optional[np.ndarray] = None  # [B, T, n] float16: count / n (0 on merged slots)
    sampled_logprobs: Optional[np.ndarray] = None  # [B, T, n] float16: teacher log-probability at tau
    hidden: Optional[np.ndarray] = None  # [B, T, H] float16: the output head's input (after the final norm)
    q: Optional[np.ndarray] = None  # [B, T, W_q] float16, the chosen layer's q_proj output
    k: Optional[np.ndarray] = None  # [B, T, W_k] float16
    v: Optional[np.ndarray] = None  # [B, T, W_v] float16

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, np.ascontiguousarray(value, dtype=DTYPES[f.name]))
        carried = [name for name in ("topk_ids", "sampled_ids", "hidden") if getattr(self, name) is not None]
        if len(carried) != 1:
            raise ValueError(f"a teacher output carries exactly one signal (top-k + tail, sampled ids or hidden "
                             f"states), not {carried or 'none'}")
        if self.hidden is None and self.temperature is None:
            raise ValueError("sparse teacher targets must carry the temperature they were computed at")

    @property
    def signal(self) -> str:
        return "topk" if self.topk_ids is not None else "sampled" if self.sampled_ids is not None else "hidden"

    @property
    def ids(self) -> Optional[np.ndarray]:
        return self.topk_ids if self.topk_ids is not None else self.sampled_ids

    @property
    def positions(self) -> tuple:
        """(batch, length) of the answer."""
        array = self.hidden if self.hidden is not None else self.ids
        assert array is not None  # __post_init__ requires exactly one of top-k ids, sampled ids, hidden
        return array.shape[:2]

    @property
    def has_qkv(self) -> bool:
        return self.q is not None

    def validate(self, input_ids: np.ndarray, vocab_size: int) -> "TeacherOutput":
        batch, length = input_ids.shape
        if self.positions != (batch, length):
            raise ValueError(f"teacher output positions {self.positions} do not match input {input_ids.shape}")
        if self.ids is not None and (self.ids.min(initial=0) < 0 or self.ids.max(initial=0) >= vocab_size):
            raise ValueError(f"teacher ids outside [0, {vocab_size})")
        for name in ("topk_logprobs", "tail_mass", "sampled_weights", "sampled_logprobs", "hidden", *QKV):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value).all():
                raise ValueError(f"teacher output '{name}' contains NaN or inf")
        return self

    def to_columns(self) -> Dict[str, np.ndarray]:
        return {PREFIX + f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_columns(cls, columns: Dict[str, np.ndarray]) -> "TeacherOutput":
        return cls(**{f.name: columns[PREFIX + f.name] for f in fields(cls) if PREFIX + f.name in columns})

    @classmethod
    def concat(cls, parts: List["TeacherOutput"]) -> "TeacherOutput":
        kwargs = {}
        for f in fields(cls):
            values = [getattr(p, f.name) for p in parts]
            kwargs[f.name] = None if values[0] is None else np.concatenate(values)
        return cls(**kwargs)

    def split(self, sizes: List[int]) -> List["TeacherOutput"]:
        bounds = np.cumsum(sizes)[:-1]
        per_field = {f.name: (None if getattr(self, f.name) is None else np.split(getattr(self, f.name), bounds))
                     for f in fields(self)}
        return [type(self)(**{name: (None if parts is None else parts[i]) for name, parts in per_field.items()})
                for i in range(len(sizes))]

    def nbytes_per_token(self) -> float:
        tokens = self.positions[0] * self.positions[1]
        return sum(getattr(self, f.name).nbytes for f in fields(self) if getattr(self, f.name) is not None) / tokens
