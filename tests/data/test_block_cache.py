"""The mixture's block cache alone, without Ray: units are "read" by a plain Python reader that hands
back asyncio futures, as the mixture's reader actors hand back object refs."""

import asyncio

import numpy as np
import pytest
import ray

from distillation.data.block_cache import BlockCache
from distillation.data.mixture import MixturePlan
from distillation.data.packing import Packed
from distillation.data.rows import RowRecipe
from distillation.data.sources import SourceSpec, Unit
from distillation.errors import DistillError

SEQ = 4


def _specs():
    return [SourceSpec(name, "jsonl", tuple(Unit(f"{name}{i}", f"/data/{name}/{i}.jsonl") for i in range(n)), "fp")
            for name, n in (("a", 5), ("b", 3))]


def _train_rows(spec, unit):
    """Unit i of a source has i % 3 + 1 rows; row r's tokens are (source, unit, r, 7)."""
    source, index = "ab".index(spec.name), spec.units.index(unit)
    count = index % 3 + 1
    rows = np.array([[source, index, r, 7] for r in range(count)], dtype=np.int32)
    return Packed(rows, np.full(count, 2, np.int32), 0, rows + 100)


class Reader:
    """`cut(recipe, spec, unit)`: a finished asyncio future per unit read, or the error queued for it."""

    def __init__(self, errors=None):
        self.started = []  # unit ids, one per read started
        self.errors = {uid: list(e) for uid, e in (errors or {}).items()}  # unit id -> its next reads' errors

    def __call__(self, recipe, spec, unit):
        self.started.append(unit.uid)
        future = asyncio.get_running_loop().create_future()
        queued = self.errors.get(unit.uid)
        if queued:
            future.set_exception(queued.pop(0))
        else:
            future.set_result({"train": _train_rows(spec, unit)})
        return future


def _cache(reader, capacity=None, packed=False):
    plan = MixturePlan(["a", "b"], [5, 3], [0.5, 0.5], seed=3, samples_per_step=4, window=2)
    return BlockCache(plan, _specs(), RowRecipe("unused", SEQ, 0.0, 0.0, packed), reader, capacity)


def _get(cache, *keys):
    async def run():
        return [await cache.get(k) for k in keys]
    return asyncio.run(run())


def test_a_block_is_its_units_rows_in_the_plans_order_and_the_next_block_is_read_ahead():
    reader = Reader()
    cache = _cache(reader, packed=True)
    key = cache.plan.cursor(0)
    packed, unit, row = _get(cache, key)[0]
    rows, lengths, positions = packed.rows, packed.lengths, packed.positions
    units = cache.plan.block_units(key).tolist()
    parts = [_train_rows(cache.specs[0], cache.specs[0].units[u]) for u in units]
    order = cache.plan.block_order(key, sum(len(p.rows) for p in parts))
    np.testing.assert_array_equal(rows, np.concatenate([p.rows for p in parts])[order])
    np.testing.assert_array_equal(positions, rows + 100)
    assert (unit == rows[:, 1]).all() and (row == rows[:, 2]).all() and (lengths == 2).all()
    assert cache.rows(key) == len(rows) and cache.rows(cache.plan.next_block(key)) is None
    ahead = cache.plan.next_block(key)  # the source's current block was read: its next one is being read
    assert list(cache.reading) == [ahead]
    assert reader.started == [f"a{u}" for u in units + cache.plan.block_units(ahead).tolist()]
    assert cache.units_read == len(reader.started)
    _get(cache, (1, 0, 1))  # not source b's current block (that is (1, 0, 0)): nothing read ahead
    assert list(cache.reading) == [ahead]


def test_the_cache_keeps_the_most_recently_used_blocks_up_to_its_bound_and_reads_an_evicted_one_again():
    reader = Reader()
    cache = _cache(reader, capacity=2)
    first, second, third = (0, 1, 1), (0, 1, 2), (1, 1, 0)  # none a source's current block: no read-ahead
    before = _get(cache, first)[0]
    _get(cache, second, first, third)  # `first` used again after `second`: `second` is the one evicted
    assert list(cache.blocks) == [first, third]
    assert cache.rows(second) is not None  # row counts outlive the rows (a replay needs them)
    reads = len(reader.started)
    again = _get(cache, second)[0]
    assert len(reader.started) > reads and len(cache.blocks) == 2 and first not in cache.blocks
    assert cache.rows(second) == len(again.unit)
    now = _get(cache, first)[0]
    for column_before, column_now in zip((*before.packed[:2], before.packed.positions, before.unit, before.row),
                                         (*now.packed[:2], now.packed.positions, now.unit, now.row)):
        np.testing.assert_array_equal(column_before, column_now)  # read again: the same rows, same order


def test_two_calls_for_one_block_share_its_read():
    reader = Reader()
    cache = _cache(reader)
    key = (1, 0, 1)

    async def both():
        return await asyncio.gather(cache.get(key), cache.get(key))

    one, two = asyncio.run(both())
    assert one is two and len(reader.started) == len(cache.plan.block_units(key))


def test_a_failed_read_is_not_remembered_and_the_next_call_reads_again():
    key = (0, 0, 1)
    plan = MixturePlan(["a", "b"], [5, 3], [0.5, 0.5], seed=3, samples_per_step=4, window=2)
    uid = f"a{plan.block_units(key)[0]}"
    reader = Reader({uid: [OSError("connection reset")]})
    cache = _cache(reader)
    with pytest.raises(OSError, match="connection reset"):
        _get(cache, key)
    assert key not in cache.reading and key not in cache.blocks and cache.bad_record is None
    rows = _get(cache, key)[0].packed.rows
    assert reader.started.count(uid) == 2 and cache.rows(key) == len(rows) > 0


def test_the_first_bad_record_is_kept_and_raised_as_a_distill_error():
    plan = MixturePlan(["a", "b"], [5, 3], [0.5, 0.5], seed=3, samples_per_step=4, window=2)
    first, later = (0, 0, 1), (1, 0, 1)
    bad = {f"a{plan.block_units(first)[0]}": [ray.exceptions.RayTaskError(
               "cut", "traceback", DistillError("/data/a/1.jsonl:3: not valid JSON"))],
           f"b{plan.block_units(later)[0]}": [ray.exceptions.RayTaskError(
               "cut", "traceback", DistillError("/data/b/2.jsonl:9: no field 'text'"))]}
    cache = _cache(Reader(bad))
    with pytest.raises(DistillError, match="/data/a/1.jsonl:3: not valid JSON") as raised:
        _get(cache, first)
    assert not isinstance(raised.value, ray.exceptions.RayTaskError)
    with pytest.raises(DistillError, match="/data/b/2.jsonl:9"):
        _get(cache, later)
    assert cache.bad_record == "/data/a/1.jsonl:3: not valid JSON"  # the first one met
    other = ray.exceptions.RayTaskError("cut", "traceback", ValueError("not a record"))
    cache = _cache(Reader({f"a{plan.block_units(first)[0]}": [other]}))
    with pytest.raises(ray.exceptions.RayTaskError):  # any other failure is not a bad record
        _get(cache, first)
    assert cache.bad_record is None
