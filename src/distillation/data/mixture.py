"""Which training row comes next: a seeded draw over sources by weight, with weights that move, over
sources streamed unit by unit.

Each source is a list of units (data/sources.py). Epoch e of a source visits its units in a seeded
order, in blocks of `window` units; a block's rows (all its units' training rows) are shuffled
together by a seeded permutation. Sample k of the run (global order; `step_of(k, samples_per_step)`
is its optimizer step, data/steps.py) picks a source with probability equal to that source's weight
at k's step (a uniform number that is a hash of the seed and k), then the next row of that source's
current block; a source whose block is spent moves to the next block, and after its last block to a
new epoch.

Weights change only on a schedule: an update computed after step s takes effect from step
s + delay. A draw for a later step waits until that update has arrived, so the draws depend on the
seed, the update values and the text, never on timing. The plan's state is small and bounded:
per-source cursors (epoch, block, row), the sample count and the weight history; a resumed run
continues from it exactly, reading the block its cursors point into.

The actor that serves the plan is roles/mixture.py; the blocks it reads are cached by
data/block_cache.py, and earlier draws are drawn again by data/replay.py.
"""

import copy
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from distillation.data.steps import samples_before, step_of
from distillation.errors import DistillError

BlockKey = Tuple[int, int, int]  # (source, epoch, block)
Address = Tuple[int, int, int, int]  # (source, epoch, block, row in the shuffled block)


def validate_weights(weights: Union[Sequence[float], np.ndarray], names: Sequence[str]) -> np.ndarray:
    """Weights are relative (documented): they are normalised to sum to one. Negative, non-finite or
    all-zero weights, or a count that does not match the sources, are errors."""
    w = np.asarray(weights, dtype=np.float64)
    given = dict(zip(names, w.tolist()))
    if len(w) != len(names) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise DistillError(f"source weights must be finite, non-negative, not all zero and one per source "
                           f"({len(names)}); got {given if len(w) == len(names) else w.tolist()}")
    return w / w.sum()


def uniforms(seed: int, ids: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per sample id: splitmix64 of (seed, id), so sample k's source choice
    needs no sequential RNG state."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.uint64) + np.uint64(seed % 2**32) * np.uint64(0x100000001B3)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


class MixturePlan:
    """The deterministic sampler. Plain Python: the `Mixture` actor (roles/mixture.py) serves it to
    the pipeline. `units` is the number of units per source; the number of rows in a block is known
    once the block is read, so `draw` asks for it through `block_rows`."""

    def __init__(self, names: Sequence[str], units: Sequence[int], weights: Union[Sequence[float], np.ndarray], seed: int,
                 samples_per_step: int, update_steps: Sequence[int] = (), delay: int = 2,
                 fingerprints: Optional[Dict[str, str]] = None, window: int = 8):
        if delay < 1:
            raise DistillError(f"influence.delay_steps must be >= 1 (the step that computes an update "
                               f"cannot also use it); got {delay}")
        if any(n <= 0 for n in units):
            raise DistillError(f"every source needs at least one unit; units {dict(zip(names, units))}")
        self.names, self.units, self.seed, self.window = list(names), [int(n) for n in units], int(seed), int(window)
        self.fingerprints = dict(fingerprints or {})  # what the rows were cut from: a resume must find the same
        self.samples_per_step, self.delay = int(samples_per_step), int(delay)
        self.update_steps = sorted(int(s) for s in update_steps)
        self.epochs, self.blocks, self.offsets = [0] * len(units), [0] * len(units), [0] * len(units)
        self.history: List[dict] = [{"step": 0, "computed_at": None, "scores": [],
                                     "weights": validate_weights(weights, names).tolist()}]
        self.count = 0  # samples drawn so far
        self._orders: "OrderedDict[tuple, np.ndarray]" = OrderedDict()  # unit orders of recent epochs

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
        last_step = step_of(count - 1, self.samples_per_step)
        for s in self.update_steps:
            if s + self.delay <= last_step and not self.received(s):
                return s
        return None

    def first_needing(self, computed_at: int) -> int:
        """The first sample whose step uses the update computed after step `computed_at`."""
        return samples_before(computed_at + self.delay, self.samples_per_step)

    # -- blocks ----------------------------------------------------------------------------
    def blocks_per_epoch(self, source: int) -> int:
        return -(-self.units[source] // self.window)

    def block_units(self, key: BlockKey) -> np.ndarray:
        """The indices of the units block `key` holds, in the epoch's seeded unit order."""
        source, epoch, block = key
        if (source, epoch) not in self._orders:
            self._orders[(source, epoch)] = np.random.default_rng([self.seed, source, epoch]).permutation(
                self.units[source])
            if len(self._orders) > 2 * len(self.units):
                self._orders.popitem(last=False)
        return self._orders[(source, epoch)][block * self.window:(block + 1) * self.window]

    def block_order(self, key: BlockKey, rows: int) -> np.ndarray:
        """The shuffled order of a block's `rows` rows."""
        return np.random.default_rng([self.seed, *key, 1]).permutation(rows)

    def next_block(self, key: BlockKey) -> BlockKey:
        source, epoch, block = key
        return (source, epoch, block + 1) if block + 1 < self.blocks_per_epoch(source) else (source, epoch + 1, 0)

    def cursor(self, source: int) -> BlockKey:
        return source, self.epochs[source], self.blocks[source]

    # -- drawing ---------------------------------------------------------------------------
    def draw(self, count: int, block_rows: Callable[[BlockKey], Optional[int]]
             ) -> Tuple[List[Address], Optional[BlockKey]]:
        """Draw samples self.count .. count-1. Stops early, before a block whose size `block_rows`
        does not know yet (None), and returns that block's key with what it drew."""
        blocked = self.blocking_update(count)
        if blocked is not None:
            raise DistillError(f"sample {count - 1} needs the weight update of step {blocked}, not received yet")
        out: List[Address] = []
        if self.count >= count:
            return out, None
        ids = np.arange(self.count, count)
        for k, u in zip(ids.tolist(), uniforms(self.seed, ids).tolist()):
            cumulative = np.cumsum(self.weights_at(step_of(k, self.samples_per_step)))
            # scaled by the sum as computed, so rounding can never pick a last source of weight 0
            source = min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), len(cumulative) - 1)
            for _ in range(self.blocks_per_epoch(source) + 1):  # move past spent (or empty) blocks
                key = self.cursor(source)
                rows = block_rows(key)
                if rows is None:
                    return out, key
                if self.offsets[source] < rows:
                    break
                _, self.epochs[source], self.blocks[source] = self.next_block(key)
                self.offsets[source] = 0
            else:
                raise DistillError(f"source '{self.names[source]}' has no training row in a whole epoch of its units")
            out.append((*key, self.offsets[source]))
            self.offsets[source] += 1
            self.count += 1
        return out, None

    # -- state -----------------------------------------------------------------------------
    def cursors(self) -> dict:
        """What moves as the plan draws (the rest of `state` is fixed or the weight history)."""
        return {"count": self.count, "epochs": list(self.epochs), "blocks": list(self.blocks),
                "offsets": list(self.offsets)}

    def state(self) -> dict:
        return {"names": self.names, "units": self.units, "seed": self.seed, "window": self.window,
                "fingerprints": dict(self.fingerprints), "samples_per_step": self.samples_per_step,
                "delay": self.delay, "update_steps": self.update_steps, **self.cursors(),
                "history": copy.deepcopy(self.history)}

    @classmethod
    def from_state(cls, state: dict) -> "MixturePlan":
        if "units" not in state:
            raise DistillError("this checkpoint's data plan comes from before sources were streamed "
                               "(it counts rows, not units); start a new run")
        plan = cls(state["names"], state["units"], state["history"][0]["weights"], state["seed"],
                   state["samples_per_step"], state["update_steps"], state["delay"], state["fingerprints"],
                   state["window"])
        plan.count = state["count"]
        plan.epochs, plan.blocks, plan.offsets = list(state["epochs"]), list(state["blocks"]), list(state["offsets"])
        plan.history = copy.deepcopy(state["history"])
        return plan

