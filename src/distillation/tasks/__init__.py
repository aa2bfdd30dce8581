"""Tasks: prompt/response data with honest held-out splits (builtin.py), and the metrics that score a
model on them (metrics.py). What crosses to other processes lives here, free of torch."""

from dataclasses import dataclass
from typing import Tuple

GENERATED = ("accuracy", "rouge_l", "exact_match")  # metrics that need a greedy answer to every record
METRICS = (*GENERATED, "label_accuracy")


@dataclass(frozen=True)
class Example:
    """One held-out record to score: the turns before its answer, and the answer."""
    prompt: Tuple[Tuple[str, str], ...]  # (role, content); a prompt/response record's is its templated prompt
    answer: str
