"""Which training row comes next: a seeded draw over sources by weight, with weights that move.

Sample k of the run (global order; `k // samples_per_step` is its optimizer step) is drawn as a
source with probability equal to that source's weight at k's step, then the next row of that
source's seeded permutation (without replacement; a source that runs out starts a new epoch).

Weights change only on a schedule: an update computed after step s takes effect from step
s + delay. A draw for a later step waits until that update has arrived, so the draws depend on the
seed and the update values, never on timing. That is what makes resume exact: the plan's state
(RNG, per-source epochs and cursors, weight history) at any sample count is saved in checkpoints.
"""

import asyncio
import copy
from typing import Dict, List, Optional, Sequence

import numpy as np
import ray

from distillation.errors import DistillError


def validate_weights(weights: Sequence[float], names: Sequence[str]) -> np.ndarray:
    """Weights are relative (documented): they are normalised to sum to one. Negative, non-finite or
    all-zero weights, or a count that does not match the sources, are errors."""
    w = np.asarray(weights, dtype=np.float64)
    given = dict(zip(names, w.tolist()))
    if len(w) != len(names) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise DistillError(f"source weights must be finite, non-negative, not all zero and one per source "
                           f"({len(names)}); got {given if len(w) == len(names) else w.tolist()}")
    return w / w.sum()


class MixturePlan:
    """The deterministic sampler. Plain Python: the `Mixture` actor below serves it to the pipeline."""

    def __init__(self, names: Sequence[str], sizes: Sequence[int], weights: Sequence[float], seed: int,
                 samples_per_step: int, update_steps: Sequence[int] = (), delay: int = 2,
                 data_sha256: Optional[Dict[str, str]] = None):
        if delay < 1:
            raise DistillError(f"influence.delay_steps must be >= 1 (the step that computes an update "
                               f"cannot also use it); got {delay}")
        if any(n <= 0 for n in sizes):
            raise DistillError(f"every source needs at least one training row; sizes {dict(zip(names, sizes))}")
        self.names, self.sizes, self.seed = list(names), [int(n) for n in sizes], int(seed)
        self.data_sha256 = dict(data_sha256 or {})  # what the rows were cut from: a resume must find the same
        self.samples_per_step, self.delay = int(samples_per_step), int(delay)
        self.update_steps = sorted(int(s) for s in update_steps)
        self.rng = np.random.default_rng(seed)
        self.epochs, self.cursors = [0] * len(sizes), [0] * len(sizes)
        self.history: List[dict] = [{"step": 0, "computed_at": None, "scores": [],
                                     "weights": validate_weights(weights, names).tolist()}]
        self.count = 0  # samples drawn so far
        self._orders: Dict[int, np.ndarray] = {}

    # -- weights ---------------------------------------------------------------------------
    def weights_at(self, step: int) -> np.ndarray:
        current = self.history[0]["weights"]
        for entry in self.history:
            if entry["step"] <= step:
                current = entry["weights"]
        return np.asarray(current)

    def received(self, computed_at: int) -> bool:
        return any(e["computed_at"] == computed_at for e in self.history)

    def set_weights(self, computed_at: int, weights: Sequence[float], scores: Sequence[float] = ()) -> bool:
        """Record the update computed after step `computed_at`; False if it was already recorded
        (a restarted worker recomputes it: the first value stands, the draws already used it)."""
        if computed_at not in self.update_steps:
            raise DistillError(f"no weight update is scheduled at step {computed_at}")
        if self.received(computed_at):
            return False
        self.history.append({"step": computed_at + self.delay, "computed_at": computed_at,
                             "weights": validate_weights(weights, self.names).tolist(),
                             "scores": [float(x) for x in scores]})
        self.history.sort(key=lambda e: e["step"])
        return True

    def blocking_update(self, count: int) -> Optional[int]:
        """The first scheduled update not yet received that samples below `count` need, if any."""
        last_step = (count - 1) // self.samples_per_step
        for s in self.update_steps:
            if s + self.delay <= last_step and not self.received(s):
                return s
        return None

    # -- drawing ---------------------------------------------------------------------------
    def _order(self, source: int) -> np.ndarray:
        key = self.epochs[source]
        if self._orders.get(source, (None,))[0] != key:
            perm = np.random.default_rng([self.seed, source, key]).permutation(self.sizes[source])
            self._orders[source] = (key, perm)
        return self._orders[source][1]

    def draw(self, count: int) -> List[tuple]:
        """Draw samples self.count .. count-1; returns their (source, row) pairs."""
        blocked = self.blocking_update(count)
        if blocked is not None:
            raise DistillError(f"sample {count - 1} needs the weight update of step {blocked}, not received yet")
        out = []
        while self.count < count:
            probs = self.weights_at(self.count // self.samples_per_step)
            source = int(np.searchsorted(np.cumsum(probs), self.rng.random() * probs.sum(), side="right"))
            source = min(source, len(probs) - 1)
            if self.cursors[source] == self.sizes[source]:
                self.epochs[source] += 1
                self.cursors[source] = 0
            out.append((source, int(self._order(source)[self.cursors[source]])))
            self.cursors[source] += 1
            self.count += 1
        return out

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"names": self.names, "sizes": self.sizes, "seed": self.seed, "data_sha256": dict(self.data_sha256),
                "samples_per_step": self.samples_per_step, "delay": self.delay,
                "update_steps": self.update_steps, "count": self.count, "epochs": list(self.epochs),
                "cursors": list(self.cursors), "rng": copy.deepcopy(self.rng.bit_generator.state),
                "history": copy.deepcopy(self.history)}

    @classmethod
    def from_state(cls, state: dict) -> "MixturePlan":
        plan = cls(state["names"], state["sizes"], state["history"][0]["weights"], state["seed"],
                   state["samples_per_step"], state["update_steps"], state["delay"], state.get("data_sha256"))
        plan.count, plan.epochs, plan.cursors = state["count"], list(state["epochs"]), list(state["cursors"])
        plan.rng.bit_generator.state = copy.deepcopy(state["rng"])
        plan.history = copy.deepcopy(state["history"])
        return plan


@ray.remote(num_cpus=0)
class Mixture:
    """The one place the running pipeline reads weights from. Holds the plan, the training rows of
    every source, and the draws a restarted worker may still ask for; `draw` awaits scheduled
    weight updates.

    Draws are kept from `start`, the sample count of the checkpoint two before the latest: a worker
    group restarts from the latest registered checkpoint, and Ray Train registers one only after
    every rank reported it, so by the time a third checkpoint is being written the first of the
    three is as far back as a restart can go. Memory is two checkpoint intervals of draws (plus the
    pipeline's look-ahead), not the run's."""

    def __init__(self, plan_state: dict, rows: Dict[str, np.ndarray], lengths: Dict[str, np.ndarray]):
        self.base_state = copy.deepcopy(plan_state)  # the plan at sample `start`
        self.plan = MixturePlan.from_state(plan_state)
        self.start = self.plan.count  # draws before this were consumed before a resume
        self.rows = [rows[n] for n in self.plan.names]
        self.lengths = [lengths[n] for n in self.plan.names]
        self.drawn: List[tuple] = []  # samples start .. plan.count - 1
        self.checkpoints: List[int] = []  # sample counts `state_at` was asked for, in order
        self.updated = asyncio.Condition()

    async def draw(self, sample_ids: np.ndarray) -> dict:
        ids = np.asarray(sample_ids, dtype=np.int64)
        self._check_kept(ids)
        need = int(ids.max()) + 1 if len(ids) else 0
        async with self.updated:
            while self.plan.count < need:
                blocked = self.plan.blocking_update(need)
                # Draw everything that does not depend on the missing update, then wait for it.
                limit = need if blocked is None else (blocked + self.plan.delay) * self.plan.samples_per_step
                self.drawn.extend(self.plan.draw(max(self.plan.count, min(need, limit))))
                if blocked is not None:
                    await self.updated.wait()
        self._check_kept(ids)  # again: draws may have been released while this call waited for an update
        picked = [self.drawn[i - self.start] for i in ids]
        source = np.array([s for s, _ in picked], dtype=np.int32)
        index = np.array([i for _, i in picked], dtype=np.int64)
        return {"sample_id": ids, "source": source, "row": index,
                "input_ids": np.stack([self.rows[s][i] for s, i in picked]) if picked else np.zeros((0, 0), np.int32),
                "length": np.array([self.lengths[s][i] for s, i in picked], dtype=np.int32)}

    async def set_weights(self, computed_at: int, weights: List[float], scores: List[float] = ()) -> bool:
        async with self.updated:
            changed = self.plan.set_weights(computed_at, weights, scores)
            self.updated.notify_all()
        return changed

    def _check_kept(self, ids: np.ndarray) -> None:
        if len(ids) and ids.min() < self.start:
            raise DistillError(f"sample {ids.min()} precedes sample {self.start}, where this run resumed or the "
                               f"checkpoint a restart could still use begins")

    def state_at(self, count: int) -> dict:
        """The plan's state after exactly `count` samples (the consumed point of a checkpoint, which
        a resumed run continues from): the state at `start` replayed with the weight history. Asked
        for a third checkpoint, it releases the draws before the first of the three."""
        state = self._replayed(count)
        # a restarted group asks again for counts it asked before: only the latest run of increasing
        # counts says how far back a restart can go
        self.checkpoints = [c for c in self.checkpoints if c < count][-2:] + [count]
        if len(self.checkpoints) >= 3 and self.checkpoints[-3] > self.start:
            release = self.checkpoints[-3]
            self.base_state = self._replayed(release)
            del self.drawn[:release - self.start]
            self.start = release
        return state

    def _replayed(self, count: int) -> dict:
        if count < self.start:
            raise DistillError(f"state at {count} precedes sample {self.start}, the earliest this mixture keeps")
        replay = MixturePlan.from_state(self.base_state)
        replay.history = copy.deepcopy(self.plan.history)
        replay.draw(count)
        return replay.state()

    def retained(self) -> dict:
        """Which draws are kept (for tests and the curious): from sample `start`, `draws` of them."""
        return {"start": self.start, "draws": len(self.drawn)}

    def history(self) -> List[dict]:
        return copy.deepcopy(self.plan.history)

    def weights_at(self, step: int) -> np.ndarray:
        return self.plan.weights_at(step)

    def influence_batches(self, step: int, batch_size: int) -> Dict[str, tuple]:
        """`batch_size` training rows per source for the influence estimate at `step`, seeded by step
        (not drawn from the plan, so estimating influence never changes what the trainer sees)."""
        rng = np.random.default_rng([self.plan.seed, step, 1])
        out = {}
        for name, rows, lengths in zip(self.plan.names, self.rows, self.lengths):
            pick = rng.choice(len(rows), size=min(batch_size, len(rows)), replace=False)
            out[name] = (rows[pick], lengths[pick])
        return out
