"""Role: the mixture, one named actor per run (`distill-mixture-<run>`, `actor_name`; no CPU booked),
created by the driver (run.py) and looked up by name by the training workers (roles/train_worker.py)
and their Ray Data stage (roles/annotate_stage.py). It serves the plan (data/mixture.py) over blocks
read by its own reader actors (roles/unit_reader.py) and cached by data/block_cache.py, and serves
earlier draws again (data/replay.py)."""

import asyncio
import copy
from typing import Dict, List, Optional, Sequence

import numpy as np
import ray

from distillation.data.block_cache import BlockCache
from distillation.data.mixture import Address, MixturePlan
from distillation.data.packing import Packed
from distillation.data.replay import WINDOW_SAMPLES, ReleasePolicy, ReplayWindow
from distillation.roles.unit_reader import Readers
from distillation.specs import MixtureSpec


def actor_name(run_name: str) -> str:
    return f"distill-mixture-{run_name}"


@ray.remote(num_cpus=0)
class Mixture:
    """The one place the running pipeline reads weights and rows from. Holds the plan, the blocks in
    use (read by its reader actors, the next block of each source read ahead), and what a restarted worker
    may still ask for; `draw` awaits scheduled weight updates.

    Memory is bounded: at most `cached_blocks` blocks of rows and the row counts of the blocks
    visited (one int each; BlockCache), the draws (4 ints each) of the current and a few recent
    windows of `window_samples` samples and the plan's cursors at every window start from `start`
    (ReplayWindow), where `start` is the sample count of the checkpoint two before the latest
    (ReleasePolicy says why). An older window's draws are drawn again from its cursors, and so is a
    checkpoint's state. A draw whose block was evicted reads it again (the same rows: reading is
    deterministic)."""

    def __init__(self, spec: MixtureSpec, cached_blocks: Optional[int] = None, window_samples: int = WINDOW_SAMPLES):
        self.readers = Readers(spec.readers, spec.reader_cpus)  # owned by this actor: they end with it
        self.plan = MixturePlan.from_state(spec.plan_state)
        self.recipe = spec.recipe
        self.pool = [spec.pool[n] for n in self.plan.names]
        self.cache = BlockCache(self.plan, [spec.sources[n] for n in self.plan.names], spec.recipe, self.readers.cut,
                                cached_blocks)
        self.replay = ReplayWindow(self.plan, self.cache.rows, window_samples)
        self.release = ReleasePolicy(self.replay)
        self.updated = asyncio.Condition()
        self.served = [0, 0]  # real tokens, row positions handed out

    async def _draw_until(self, need: int) -> None:
        """Draw up to sample `need`, reading blocks as the plan reaches them, waiting for updates,
        keeping the cursors at every window start."""
        while self.plan.count < need:
            blocked = self.plan.blocking_update(need)
            limit = need
            if blocked is not None:  # draw what does not depend on the missing update, then wait
                limit = self.plan.first_needing(blocked)
                if self.plan.count >= limit:
                    await self.updated.wait()
                    continue
            missing = self.replay.advance(min(need, limit))
            if missing is not None:
                await self.cache.get(missing)

    async def draw(self, sample_ids: np.ndarray) -> dict:
        ids = np.asarray(sample_ids, dtype=np.int64)
        self.release.check_kept(ids)
        need = int(ids.max()) + 1 if len(ids) else 0
        if need > self.plan.count:  # drawn in order, one call at a time; rows drawn already need no lock
            async with self.updated:
                await self._draw_until(need)
        self.release.check_kept(ids)  # again: draws may have been released while this call waited for an update
        picked = self.replay.addresses(ids)
        blocks = {}
        for key in dict.fromkeys(p[:3] for p in picked):  # each block this call needs, once
            blocks[key] = await self.cache.get(key)
        return self._rows(ids, picked, blocks)

    def _rows(self, ids: np.ndarray, picked: List[Address], blocks: dict) -> dict:
        """The picked rows as the trainer's columns: input_ids, length (positions for packed rows,
        labelled with records), and sample_id, source, unit, row for the ledger."""
        chosen = [(blocks[p[:3]], p[3]) for p in picked]
        seq_len = self.recipe.seq_len
        lengths = np.array([b.packed.lengths[i] for b, i in chosen], dtype=np.int32)
        self.served[0] += int(lengths.sum())
        self.served[1] += len(lengths) * seq_len

        def stacked(column: str, dtype: type) -> np.ndarray:
            values = [getattr(b.packed, column)[i] for b, i in chosen]
            return np.stack(values) if values else np.zeros((0, seq_len), dtype)
        rows = {"sample_id": ids, "source": np.array([p[0] for p in picked], dtype=np.int32),
                "unit": np.array([b.unit[i] for b, i in chosen], dtype=np.int64),
                "row": np.array([b.row[i] for b, i in chosen], dtype=np.int64),
                "input_ids": stacked("rows", np.int32), "length": lengths}
        if self.recipe.pack_documents:
            rows["positions"] = stacked("positions", np.int32)
        if self.recipe.records:
            rows["labelled"] = stacked("labelled", bool)
        return rows

    async def set_weights(self, computed_at: int, weights: List[float], scores: Sequence[float] = ()) -> bool:
        async with self.updated:
            changed = self.plan.set_weights(computed_at, weights, scores)
            self.updated.notify_all()
        return changed

    def state_at(self, count: int) -> dict:
        """The plan's state after exactly `count` samples (the consumed point of a checkpoint, which
        a resumed run continues from), drawn again from the cursors of its window. Asked for a
        third checkpoint, it releases what precedes the first of the three."""
        return self.release.state_at(count)

    def retained(self) -> dict:
        """What is kept and read (the run's summary reports it): the first sample still served
        (`start`), draws held, window cursors, blocks of rows, units read so far, real tokens per
        row position over the rows handed out, peak RSS."""
        from distillation.cluster import peak_rss_mb

        return {"start": self.release.start, "draws": self.replay.held(), "windows": len(self.replay.cursors),
                "blocks": len(self.cache.blocks), "units_read": self.cache.units_read,
                "fill_ratio": self.served[0] / max(1, self.served[1]), "peak_rss_mb": peak_rss_mb()}

    def history(self) -> List[dict]:
        return copy.deepcopy(self.plan.history)

    def failure(self) -> Optional[str]:
        """The first bad record met while reading (file, line and what is wrong), or None."""
        return self.cache.bad_record

    def weights_at(self, step: int) -> np.ndarray:
        return self.plan.weights_at(step)

    def influence_batches(self, step: int, batch_size: int) -> Dict[str, Packed]:
        """`batch_size` rows per source for the influence estimate at `step` from the sources' pools,
        seeded by step (not drawn from the plan, so estimating influence never changes what the
        trainer sees)."""
        rng = np.random.default_rng([self.plan.seed, step, 1])
        out = {}
        for name, pool in zip(self.plan.names, self.pool):
            out[name] = pool.take(rng.choice(len(pool.rows), size=min(batch_size, len(pool.rows)), replace=False))
        return out


def start_mixture(run_name: str, spec: MixtureSpec) -> "ray.actor.ActorHandle":
    return Mixture.options(name=actor_name(run_name)).remote(spec)  # type: ignore[attr-defined]  # @ray.remote: an ActorClass
