"""What every teacher kind offers the Serve deployment (and the precompute job)."""

from typing import Optional, Protocol, runtime_checkable

import numpy as np

from distillation.teachers.schema import TeacherOutput


@runtime_checkable
class Teacher(Protocol):
    @property
    def vocab_size(self) -> Optional[int]:
        """The real vocabulary; None where only the answers tell it (a vLLM server given none)."""

    def score(self, input_ids: np.ndarray, positions: Optional[np.ndarray] = None) -> TeacherOutput:
        """Answers for token ids [batch, length] (position t: the distribution over token t + 1);
        `positions` for packed rows, whose documents are scored each on its own (data/packing.py)."""

    def describe(self) -> dict:
        """Kind, signal settings and counters, for the run summary and the dashboard."""

    def check_health(self) -> None:
        """Raise if this teacher cannot answer (Serve then replaces the replica)."""

    def flush(self) -> None:
        """Persist anything buffered (write-through cache answers)."""

    def close(self) -> None:
        """Release what outlives the object otherwise (a vLLM engine's process)."""


class TeacherBase:
    """No-op defaults for the optional parts of `Teacher`."""

    def check_health(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
