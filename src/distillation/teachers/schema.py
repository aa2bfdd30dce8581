"""The one message every teacher sends: sparse targets (and optional Q/K/V) as numpy arrays.

Alignment: position t holds the teacher's distribution over token t + 1, exactly like the
student's logits at t. The last position therefore has no label and is masked by the loss.
Values are log_softmax(raw_logits / temperature): the temperature is applied once, by the teacher,
and travels with the data so the loss can check it matches its own.
On the wire (object store, Ray Data columns) there are no per-token Python objects.
"""

from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import numpy as np

PREFIX = "teacher_"
QKV = ("q", "k", "v")


@dataclass
class TeacherOutput:
    topk_ids: np.ndarray  # [B, T, k] int32
    topk_logprobs: np.ndarray  # [B, T, k] float16
    tail_mass: np.ndarray  # [B, T] float32: 1 - sum(exp(topk_logprobs)), the mass outside the top-k
    temperature: np.ndarray  # [B] float32: the tau already applied (one per row, so rows travel alone)
    q: Optional[np.ndarray] = None  # [B, T, W_q] float16, the chosen layer's q_proj output
    k: Optional[np.ndarray] = None  # [B, T, W_k] float16
    v: Optional[np.ndarray] = None  # [B, T, W_v] float16

    def __post_init__(self):
        self.topk_ids = np.ascontiguousarray(self.topk_ids, dtype=np.int32)
        self.topk_logprobs = np.ascontiguousarray(self.topk_logprobs, dtype=np.float16)
        self.tail_mass = np.ascontiguousarray(self.tail_mass, dtype=np.float32)
        self.temperature = np.ascontiguousarray(self.temperature, dtype=np.float32)
        for key in QKV:
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, np.ascontiguousarray(value, dtype=np.float16))

    @property
    def has_qkv(self) -> bool:
        return self.q is not None

    def validate(self, input_ids: np.ndarray, vocab_size: int) -> "TeacherOutput":
        batch, length = input_ids.shape
        if self.topk_ids.shape[:2] != (batch, length) or self.tail_mass.shape != (batch, length):
            raise ValueError(f"teacher output shape {self.topk_ids.shape} does not match input {input_ids.shape}")
        if self.topk_ids.min(initial=0) < 0 or self.topk_ids.max(initial=0) >= vocab_size:
            raise ValueError(f"teacher top-k ids outside [0, {vocab_size})")
        for name in ("topk_logprobs", "tail_mass", *QKV):
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
        tokens = self.tail_mass.size
        return sum(getattr(self, f.name).nbytes for f in fields(self) if getattr(self, f.name) is not None) / tokens
