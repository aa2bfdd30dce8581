"""Which packed sequence the trainer sees next: a seeded draw over sources by weight.

Within a source, sequences are visited in a seeded permutation without replacement; a source that
runs out starts a fresh permutation (a new epoch of that source).
"""

from typing import List, Sequence

import numpy as np

from distillation.errors import DistillError


def validate_weights(weights: Sequence[float], names: Sequence[str]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise DistillError(f"source weights must be finite, non-negative and not all zero; got "
                           f"{dict(zip(names, w.tolist()))}")
    return w / w.sum()


def draw_plan(sizes: Sequence[int], weights: Sequence[float], count: int, seed: int) -> List[tuple]:
    """`count` (source index, sequence index) pairs, deterministic for `seed`."""
    rng = np.random.default_rng(seed)
    probs = np.asarray(weights, dtype=np.float64)
    cursors = [0] * len(sizes)
    orders = [rng.permutation(n) for n in sizes]
    plan = []
    for source in rng.choice(len(sizes), size=count, p=probs):
        if cursors[source] == sizes[source]:
            orders[source], cursors[source] = rng.permutation(sizes[source]), 0
        plan.append((int(source), int(orders[source][cursors[source]])))
        cursors[source] += 1
    return plan
