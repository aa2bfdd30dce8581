"""Which training row comes next: a seeded draw over sources by weight, with weights that move, over
sources streamed unit by unit.

Each source is a list of units (data/sources.py). Epoch e of a source visits its units in a seeded
order, in blocks of `window` units; a block's rows (all its units' training rows) are shuffled
together by a seeded permutation. Sample k of the run (global order; `k // samples_per_step` is its
optimizer step) picks a source with probability equal to that source's weight at k's step (a uniform
number that is a hash of the seed and k), then the next row of that source's current block; a source
whose block is spent moves to the next block, and after its last block to a new epoch.

Weights change only on a schedule: an update computed after step s takes effect from step
s + delay. A draw for a later step waits until that update has arrived, so the draws depend on the
seed, the update values and the text, never on timing. The plan's state is small and bounded:
per-source cursors (epoch, block, row), the sample count and the weight history; a resumed run
continues from it exactly, reading the block its cursors point into.
"""

import asyncio
import copy
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import ray

from distillation.errors import DistillError

BlockKey = Tuple[int, int, int]  # (source, epoch, block)
Address = Tuple[int, int, int, int]  # (source, epoch, block, row in the shuffled block)


def validate_weights(weights: Sequence[float], names: Sequence[str]) -> np.ndarray:
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
    """The deterministic sampler. Plain Python: the `Mixture` actor below serves it to the pipeline.
    `units` is the number of units per source; the number of rows in a block is known once the
    block is read, so `draw` asks for it through `block_rows`."""

    def __init__(self, names: Sequence[str], units: Sequence[int], weights: Sequence[float], seed: int,
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
        last_step = (count - 1) // self.samples_per_step
        for s in self.update_steps:
            if s + self.delay <= last_step and not self.received(s):
                return s
        return None

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
            cumulative = np.cumsum(self.weights_at(k // self.samples_per_step))
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


WINDOW_SAMPLES = 4096  # the actor keeps the plan's cursors every this many samples


@ray.remote(num_cpus=0)
class Mixture:
    """The one place the running pipeline reads weights and rows from. Holds the plan, the blocks in
    use (read by its reader actors, the next block of each source read ahead), and what a restarted worker
    may still ask for; `draw` awaits scheduled weight updates.

    Memory is bounded: at most `cached_blocks` blocks of rows, the row counts of the blocks visited
    (one int each), the draws (4 ints each) of the current and a few recent windows of
    WINDOW_SAMPLES samples, and the plan's cursors at every window start from `start`. An older
    window's draws are drawn again from its cursors (the plan is deterministic; the blocks it passes
    are known), and so is a checkpoint's state. `start` is the sample count of the checkpoint two
    before the latest: a worker group restarts from the latest registered checkpoint, and Ray Train
    registers one only after every rank reported it, so by the time a third checkpoint is being
    written the first of the three is as far back as a restart can go. A draw whose block was
    evicted reads it again (the same rows: reading is deterministic)."""

    def __init__(self, plan_state: dict, corpus_specs: dict, recipe, pool: Dict[str, tuple],
                 readers: int = 2, reader_cpus: float = 0.0, cached_blocks: Optional[int] = None,
                 window_samples: int = WINDOW_SAMPLES):
        from distillation.data.corpus import Readers

        self.readers = Readers(readers, reader_cpus)  # owned by this actor: they end with it
        self.plan = MixturePlan.from_state(plan_state)
        self.template = {k: v for k, v in plan_state.items() if k != "history"}  # fixed fields, for replays
        self.specs = [corpus_specs[n] for n in self.plan.names]
        self.recipe = recipe
        self.pool = [pool[n] for n in self.plan.names]
        self.origin = self.start = self.plan.count  # draws before `start` were consumed before a resume
        self.window_samples = window_samples
        self.cursors: Dict[int, dict] = {self.origin: self.plan.cursors()}  # at every window start
        self.current: List[Address] = []  # draws of the window that begins at current_start
        self.current_start = self.origin
        self.windows: "OrderedDict[int, List[Address]]" = OrderedDict()  # a few earlier windows' draws
        self.checkpoints: List[int] = []  # sample counts `state_at` was asked for, in order
        self.updated = asyncio.Condition()
        self.cached_blocks = cached_blocks or 2 * len(self.specs) + 2  # the current and the next block per source
        self.blocks: "OrderedDict[BlockKey, tuple]" = OrderedDict()  # LRU of shuffled row columns
        self.reading: Dict[BlockKey, list] = {}  # blocks being read: their units' task refs
        self.block_rows: Dict[BlockKey, int] = {}
        self.served = [0, 0]  # real tokens, row positions handed out
        self.units_read = 0
        self.bad_record: Optional[str] = None  # the first unreadable record met (file and line)

    # -- blocks ----------------------------------------------------------------------------
    def _start_reading(self, key: BlockKey) -> None:
        if key not in self.blocks and key not in self.reading:
            spec, units = self.specs[key[0]], self.plan.block_units(key)
            self.units_read += len(units)
            self.reading[key] = [self.readers.cut(self.recipe, spec, spec.units[u]) for u in units]

    async def _block(self, key: BlockKey) -> tuple:
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return self.blocks[key]
        self._start_reading(key)
        refs = self.reading[key]
        try:
            parts = [part["train"] for part in await asyncio.gather(*refs)]
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, DistillError):  # a bad record: the driver polls `failure` and stops the run
                self.bad_record = self.bad_record or str(exc.cause)
                raise DistillError(str(exc.cause)) from None
            raise
        finally:  # a failed read is tried again by the next call, not remembered
            if self.reading.get(key) is refs:
                del self.reading[key]
        if key in self.blocks:  # another call finished the same read while this one awaited it
            return self.blocks[key]
        units = self.plan.block_units(key)
        columns = (np.concatenate([p.rows for p in parts]), np.concatenate([p.lengths for p in parts]),
                   np.concatenate([np.full(len(p.rows), u, np.int64) for u, p in zip(units, parts)]),
                   np.concatenate([np.arange(len(p.rows), dtype=np.int64) for p in parts]))
        if self.recipe.pack_documents:
            columns += (np.concatenate([p.positions for p in parts]),)
        order = self.plan.block_order(key, len(columns[0]))
        self.blocks[key] = tuple(c[order] for c in columns)  # rows, lengths, unit, row in unit[, positions]
        self.block_rows[key] = len(order)
        while len(self.blocks) > self.cached_blocks:
            self.blocks.popitem(last=False)
        if key == self.plan.cursor(key[0]):  # the source's current block: read its next one ahead
            self._start_reading(self.plan.next_block(key))
        return self.blocks[key]

    # -- draws -----------------------------------------------------------------------------
    def _window(self, count: int) -> int:
        return self.origin + (count - self.origin) // self.window_samples * self.window_samples

    def _plan_at(self, window: int) -> MixturePlan:
        return MixturePlan.from_state({**self.template, **self.cursors[window],
                                       "history": copy.deepcopy(self.plan.history)})

    def _redraw(self, plan: MixturePlan, count: int) -> List[Address]:
        drawn, missing = plan.draw(count, self.block_rows.get)
        if missing is not None:  # every block it passes was read when these samples were first drawn
            raise DistillError(f"replaying the mixture to sample {count} needs block {missing}, never read")
        return drawn

    def _addresses(self, ids: np.ndarray) -> List[Address]:
        out = []
        for i in ids.tolist():
            window = self._window(i)
            if window == self.current_start:
                out.append(self.current[i - window])
                continue
            if window not in self.windows:
                self._keep(window, self._redraw(self._plan_at(window), window + self.window_samples))
            self.windows.move_to_end(window)
            out.append(self.windows[window][i - window])
        return out

    def _keep(self, window: int, draws: List[Address]) -> None:
        self.windows[window] = draws
        while len(self.windows) > 3:
            self.windows.popitem(last=False)

    async def _draw_until(self, need: int) -> None:
        """Draw up to sample `need`, reading blocks as the plan reaches them, waiting for updates,
        keeping the cursors at every window start."""
        while self.plan.count < need:
            blocked = self.plan.blocking_update(need)
            limit = need
            if blocked is not None:  # draw what does not depend on the missing update, then wait
                limit = (blocked + self.plan.delay) * self.plan.samples_per_step
                if self.plan.count >= limit:
                    await self.updated.wait()
                    continue
            boundary = self.current_start + self.window_samples
            drawn, missing = self.plan.draw(min(need, limit, boundary), self.block_rows.get)
            self.current.extend(drawn)
            if self.plan.count == boundary:
                self.cursors[boundary] = self.plan.cursors()
                self._keep(self.current_start, self.current)
                self.current, self.current_start = [], boundary
            if missing is not None:
                await self._block(missing)

    async def draw(self, sample_ids: np.ndarray) -> dict:
        ids = np.asarray(sample_ids, dtype=np.int64)
        self._check_kept(ids)
        need = int(ids.max()) + 1 if len(ids) else 0
        if need > self.plan.count:  # drawn in order, one call at a time; rows drawn already need no lock
            async with self.updated:
                await self._draw_until(need)
        self._check_kept(ids)  # again: draws may have been released while this call waited for an update
        picked = self._addresses(ids)
        blocks = {}
        for key in dict.fromkeys(p[:3] for p in picked):  # each block this call needs, once
            blocks[key] = await self._block(key)
        columns = [[], [], [], [], []]  # rows, lengths, unit, row in unit, positions (packed rows only)
        for source, epoch, block, index in picked:
            for column, values in zip(columns, blocks[(source, epoch, block)]):
                column.append(values[index])
        lengths = np.array(columns[1], dtype=np.int32)
        self.served[0] += int(lengths.sum())
        self.served[1] += len(lengths) * self.recipe.seq_len
        empty = np.zeros((0, self.recipe.seq_len), np.int32)
        rows = {"sample_id": ids, "source": np.array([p[0] for p in picked], dtype=np.int32),
                "unit": np.array(columns[2], dtype=np.int64), "row": np.array(columns[3], dtype=np.int64),
                "input_ids": np.stack(columns[0]) if picked else empty, "length": lengths}
        if self.recipe.pack_documents:
            rows["positions"] = np.stack(columns[4]) if picked else empty
        return rows

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
        a resumed run continues from), drawn again from the cursors of its window. Asked for a
        third checkpoint, it releases what precedes the first of the three."""
        state = self._replayed(count)
        # a restarted group asks again for counts it asked before: only the latest run of increasing
        # counts says how far back a restart can go
        self.checkpoints = [c for c in self.checkpoints if c < count][-2:] + [count]
        if len(self.checkpoints) >= 3 and self.checkpoints[-3] > self.start:
            self.start = self.checkpoints[-3]
            for window in [w for w in self.cursors if w + self.window_samples <= self.start]:
                del self.cursors[window]
                self.windows.pop(window, None)
        return state

    def _replayed(self, count: int) -> dict:
        if count < self.start:
            raise DistillError(f"state at {count} precedes sample {self.start}, the earliest this mixture keeps")
        if count > self.plan.count:
            raise DistillError(f"state at {count} is past sample {self.plan.count}, the last drawn")
        plan = self._plan_at(self._window(count))
        self._redraw(plan, count)
        return plan.state()

    def retained(self) -> dict:
        """What is kept and read (the run's summary reports it): the first sample still served
        (`start`), draws held, window cursors, blocks of rows, units read so far, real tokens per
        row position over the rows handed out, peak RSS."""
        from distillation.cluster import peak_rss_mb

        kept = len(self.current) + sum(len(w) for w in self.windows.values())
        return {"start": self.start, "draws": kept, "windows": len(self.cursors), "blocks": len(self.blocks),
                "units_read": self.units_read, "fill_ratio": self.served[0] / max(1, self.served[1]),
                "peak_rss_mb": peak_rss_mb()}

    def history(self) -> List[dict]:
        return copy.deepcopy(self.plan.history)

    def failure(self) -> Optional[str]:
        """The first bad record met while reading (file, line and what is wrong), or None."""
        return self.bad_record

    def weights_at(self, step: int) -> np.ndarray:
        return self.plan.weights_at(step)

    def influence_batches(self, step: int, batch_size: int) -> Dict[str, tuple]:
        """`batch_size` rows per source for the influence estimate at `step` from the sources' pools,
        seeded by step (not drawn from the plan, so estimating influence never changes what the
        trainer sees)."""
        rng = np.random.default_rng([self.plan.seed, step, 1])
        out = {}
        for name, columns in zip(self.plan.names, self.pool):  # rows, lengths, positions (None: unpacked)
            pick = rng.choice(len(columns[0]), size=min(batch_size, len(columns[0])), replace=False)
            out[name] = tuple(None if c is None else c[pick] for c in columns)
        return out
