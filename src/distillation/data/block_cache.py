"""The blocks of rows the mixture draws from: each block's units read (by whatever `cut` sends them
to: the mixture's reader actors), their training rows shuffled together by the plan's seeded block
order, the most recently used few kept. Reading is deterministic, so an evicted block read again
holds the same rows in the same order.

Plain Python over awaitables: the Mixture actor (roles/mixture.py) passes its readers' `cut`, whose
Ray object refs it awaits; a test can pass asyncio futures.
"""

import asyncio
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import ray

from distillation.data.mixture import BlockKey, MixturePlan
from distillation.data.packing import Packed, concat
from distillation.data.sources import SourceSpec, Unit
from distillation.errors import DistillError

# cut(recipe, spec, unit): starts reading a unit, returns what awaits its rows by split ({"train": Packed,
# ...}); it may be awaited more than once (a Ray object ref, an asyncio future)
Cut = Callable[[Any, SourceSpec, Unit], Awaitable[dict]]


class Block(NamedTuple):
    """A block's training rows in its seeded order, and where each came from (for the ledger)."""
    packed: Packed  # every column the rows have (positions for packed rows, labelled with records)
    unit: np.ndarray  # [N] int64: the unit's index in its source
    row: np.ndarray  # [N] int64: the row's index in its unit


class BlockCache:
    """An LRU of at most `capacity` blocks of shuffled rows (`Block`), with the row count of every
    block read (one int each, which a replay of the plan needs) and the next block of a source read
    ahead when its current one is read.

    `plan` is the live plan (its cursors say which block is a source's current one), `specs` the
    sources in the plan's order, `recipe` the RowRecipe (data/corpus.py) units are cut with."""

    def __init__(self, plan: MixturePlan, specs: Sequence[SourceSpec], recipe, cut: Cut,
                 capacity: Optional[int] = None):
        self.plan, self.specs, self.recipe, self.cut = plan, list(specs), recipe, cut
        self.capacity = capacity or 2 * len(self.specs) + 2  # the current and the next block per source
        self.blocks: "OrderedDict[BlockKey, Block]" = OrderedDict()  # LRU of shuffled rows
        self.reading: Dict[BlockKey, list] = {}  # blocks being read: what awaits their units' rows
        self.block_rows: Dict[BlockKey, int] = {}
        self.units_read = 0
        self.bad_record: Optional[str] = None  # the first unreadable record met (file and line)

    def rows(self, key: BlockKey) -> Optional[int]:
        """The block's row count, None if it was never read (what `MixturePlan.draw` asks)."""
        return self.block_rows.get(key)

    def start_reading(self, key: BlockKey) -> None:
        if key not in self.blocks and key not in self.reading:
            spec, units = self.specs[key[0]], self.plan.block_units(key)
            self.units_read += len(units)
            self.reading[key] = [self.cut(self.recipe, spec, spec.units[u]) for u in units]

    async def get(self, key: BlockKey) -> Block:
        """The block's shuffled rows, read (or waited for) if not cached."""
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return self.blocks[key]
        parts = await self._read(key)
        if key in self.blocks:  # another call finished the same read while this one awaited it
            return self.blocks[key]
        block = self._shuffled(key, parts)
        self.blocks[key] = block
        self.block_rows[key] = len(block.unit)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        if key == self.plan.cursor(key[0]):  # the source's current block: read its next one ahead
            self.start_reading(self.plan.next_block(key))
        return block

    async def _read(self, key: BlockKey) -> list:
        """The training rows of the block's units, in the block's unit order."""
        self.start_reading(key)
        pending = self.reading[key]
        try:
            return [part["train"] for part in await asyncio.gather(*pending)]
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, DistillError):  # a bad record: the driver polls `failure` and stops the run
                self.bad_record = self.bad_record or str(exc.cause)
                raise DistillError(str(exc.cause)) from None
            raise
        finally:  # a failed read is tried again by the next call, not remembered
            if self.reading.get(key) is pending:
                del self.reading[key]

    def _shuffled(self, key: BlockKey, parts: List[Packed]) -> Block:
        """The units' rows together, in the block's seeded order."""
        units = self.plan.block_units(key)
        block = Block(concat(parts, self.recipe.seq_len),
                      np.concatenate([np.full(len(p.rows), u, np.int64) for u, p in zip(units, parts)]),
                      np.concatenate([np.arange(len(p.rows), dtype=np.int64) for p in parts]))
        order = self.plan.block_order(key, len(block.unit))
        return Block(block.packed.take(order), block.unit[order], block.row[order])
