"""The mixture: the seeded plan (weights, blocks of units, exact resume, scheduled updates) and the
actor that serves it, reading sources unit by unit."""

import json

import numpy as np
import pytest
import ray

from conftest import jsonl_mixture_inputs
from distillation.data.mixture import MixturePlan, uniforms, validate_weights
from distillation.data.packing import Packed
from distillation.errors import DistillError
from distillation.roles.mixture import Mixture
from distillation.specs import MixtureSpec


def _plan(**kw):
    args = dict(names=["a", "b"], units=[5, 12], weights=[0.25, 0.75], seed=3, samples_per_step=10, window=4)
    return MixturePlan(**{**args, **kw})


def _rows(key):
    """A fixed, uneven row count per block (a stand-in for reading it), empty blocks included."""
    source, epoch, block = key
    return (7 * source + 3 * epoch + 5 * block) % 11


def _draw(plan, count):
    out = []
    while plan.count < count:
        drawn, missing = plan.draw(count, _rows)
        assert missing is None
        out += drawn
    return out


def test_plan_is_seeded_follows_weights_and_visits_every_row_of_a_block_once():
    draws = _draw(_plan(), 4000)
    assert draws == _draw(_plan(), 4000)
    assert abs(np.mean([a[0] for a in draws]) - 0.75) < 0.03
    by_block = {}
    for source, epoch, block, row in draws:
        by_block.setdefault((source, epoch, block), []).append(row)
    complete = [k for k in by_block if k != max(b for b in by_block if b[0] == k[0])]  # all but each source's last
    assert complete and all(by_block[k] == list(range(_rows(k))) for k in complete)
    assert all(_rows(k) > 0 for k in by_block)  # empty blocks are skipped


def test_an_epoch_visits_every_unit_once_in_a_seeded_order():
    plan = _plan()
    for source in (0, 1):
        for epoch in (0, 1):
            units = np.concatenate([plan.block_units((source, epoch, b)) for b in range(plan.blocks_per_epoch(source))])
            assert sorted(units.tolist()) == list(range(plan.units[source]))
    assert plan.block_units((1, 0, 0)).tolist() != plan.block_units((1, 1, 0)).tolist()
    u = uniforms(3, np.arange(100_000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert uniforms(3, np.arange(5)).tolist() == uniforms(3, np.arange(5)).tolist() != uniforms(4, np.arange(5)).tolist()


def test_the_plan_stops_at_a_block_it_does_not_know_and_resumes_there():
    plan, known = _plan(), {}
    drawn, missing = plan.draw(50, known.get)
    assert drawn == [] and missing is not None and plan.count == 0
    known[missing] = _rows(missing)
    drawn, _ = plan.draw(50, known.get)
    assert len(drawn) > 0 and all(d[:3] in known for d in drawn)


def test_plan_resumes_from_its_state_exactly_including_weight_updates():
    whole = _plan(update_steps=[5], delay=2)
    whole.set_weights(5, [0.9, 0.1])
    expected = _draw(whole, 300)
    first = _plan(update_steps=[5], delay=2)
    part = _draw(first, 40)
    state = json.loads(json.dumps(first.state()))  # through JSON, as in a checkpoint
    assert set(state) >= {"epochs", "blocks", "offsets", "count", "history"} and "drawn" not in state
    resumed = MixturePlan.from_state(state)
    resumed.set_weights(5, [0.9, 0.1])
    assert part + _draw(resumed, 300) == expected


def test_plan_refuses_to_draw_past_a_missing_update_and_ignores_a_repeated_one():
    plan = _plan(update_steps=[5], delay=2)
    _draw(plan, 70)  # steps 0..6: step 7 is the first that needs the update of step 5
    with pytest.raises(DistillError, match="update of step 5"):
        plan.draw(71, _rows)
    assert plan.set_weights(5, [1, 0]) and not plan.set_weights(5, [0, 1])
    assert {a[0] for a in _draw(plan, 200)[-100:]} == {0}
    with pytest.raises(DistillError, match="no weight update is scheduled"):
        plan.set_weights(6, [1, 0])


def test_a_checkpoint_from_before_streaming_is_a_clear_error():
    with pytest.raises(DistillError, match="before sources were streamed"):
        MixturePlan.from_state({"names": ["a"], "sizes": [10], "count": 0})


def test_weights_are_relative_but_must_be_non_negative_and_not_all_zero():
    assert validate_weights([1, 3], ["a", "b"]).tolist() == [0.25, 0.75]
    for bad in ([0, 0], [1, -1], [1, float("nan")], [1]):
        with pytest.raises(DistillError, match="non-negative, not all zero and one per source"):
            validate_weights(bad, ["a", "b"])


def _actor(tmp_path, tokenizer_dir, plan_kw, **actor_kw):
    specs, recipe, pool = jsonl_mixture_inputs(tmp_path, tokenizer_dir)
    plan = MixturePlan(["a", "b"], [len(specs[n].units) for n in "ab"], **plan_kw)
    return Mixture.remote(MixtureSpec(plan.state(), specs, recipe, pool, 2, 0.0), **actor_kw), plan, specs, recipe


def test_mixture_actor_proportions_follow_an_update_from_the_next_step_on(ray_cluster, smollm2_dir, tmp_path):
    """The running pipeline reads weights from the actor: measure what it draws before and after."""
    mixture, *_ = _actor(tmp_path, smollm2_dir, dict(weights=[0.5, 0.5], seed=0, samples_per_step=100,
                                                     update_steps=[10], delay=1, window=2))
    before = ray.get(mixture.draw.remote(np.arange(0, 1000)))["source"]
    pending = mixture.draw.remote(np.arange(1100, 1200))  # step 11 needs the update of step 10
    assert not ray.wait([pending], timeout=1.0)[0]  # ... so it waits for it
    ray.get(mixture.set_weights.remote(10, [0.1, 0.9]))
    ray.get(pending)
    after = ray.get(mixture.draw.remote(np.arange(1100, 3000)))["source"]
    assert abs(before.mean() - 0.5) < 0.05 and abs(after.mean() - 0.9) < 0.03
    batch = ray.get(mixture.draw.remote(np.array([5, 6])))
    assert batch["input_ids"].shape == (2, 64) and (batch["length"] >= 2).all()
    replay = MixturePlan.from_state(ray.get(mixture.state_at.remote(1500)))
    assert replay.count == 1500 and replay.weights_at(20).tolist() == [0.1, 0.9]


def test_rows_are_the_units_text_read_lazily_in_bounded_memory_and_reread_exactly(ray_cluster, smollm2_dir, tmp_path):
    mixture, plan, specs, recipe = _actor(tmp_path, smollm2_dir, dict(weights=[0.5, 0.5], seed=1, samples_per_step=8,
                                                                      window=2), cached_blocks=2)
    first = ray.get(mixture.draw.remote(np.arange(0, 40)))
    kept = ray.get(mixture.retained.remote())
    assert kept["units_read"] < sum(len(s.units) for s in specs.values())  # 40 rows need only the first blocks
    for i in range(len(first["sample_id"])):  # each row is its unit's row, as the recipe cuts it
        spec = specs["ab"[first["source"][i]]]
        train = recipe.cut(spec, spec.units[first["unit"][i]])["train"]
        np.testing.assert_array_equal(first["input_ids"][i], train.rows[first["row"][i]])
    later = ray.get(mixture.draw.remote(np.arange(40, 1500)))  # several epochs of both sources
    assert ray.get(mixture.retained.remote())["blocks"] <= 2
    again = ray.get(mixture.draw.remote(np.arange(0, 40)))  # their blocks were evicted: read again
    for column in ("source", "unit", "row", "input_ids", "length"):
        np.testing.assert_array_equal(again[column], first[column])
    rows = [(s, u, r) for s, u, r in zip(later["source"], later["unit"], later["row"])]
    assert len(set(rows[:200])) == 200  # without replacement within an epoch


def test_the_mixture_keeps_draws_back_to_the_checkpoint_two_before_the_latest_and_stays_exact(
        ray_cluster, smollm2_dir, tmp_path):
    kw = dict(weights=[0.3, 0.7], seed=3, samples_per_step=10, update_steps=[4], delay=1, window=2)
    # windows of 64 samples: cursors at 0, 64, ..., 256; older windows' draws are drawn again from them
    mixture, _, specs, recipe = _actor(tmp_path / "one", smollm2_dir, kw, window_samples=64)
    reference, *_ = _actor(tmp_path / "two", smollm2_dir, kw)  # never asked for a checkpoint: keeps all
    for m in (mixture, reference):
        ray.get(m.draw.remote(np.arange(0, 50)))
        ray.get(m.set_weights.remote(4, [0.9, 0.1]))
    first = ray.get(mixture.draw.remote(np.arange(0, 300)))
    whole = ray.get(reference.draw.remote(np.arange(0, 300)))
    np.testing.assert_array_equal(first["input_ids"], whole["input_ids"])
    for count, kept_from, windows in ((100, 0, 5), (200, 0, 5), (250, 100, 4), (300, 200, 2)):  # checkpoints
        state = ray.get(mixture.state_at.remote(count))
        fresh, *_ = _actor(tmp_path / f"at{count}", smollm2_dir, kw)
        ray.get(fresh.draw.remote(np.arange(0, 50)))
        ray.get(fresh.set_weights.remote(4, [0.9, 0.1]))
        ray.get(fresh.draw.remote(np.arange(0, count)))
        assert state == ray.get(fresh.state_at.remote(count))  # exact, whatever was released
        ray.kill(fresh)
        kept = ray.get(mixture.retained.remote())
        assert (kept["start"], kept["windows"]) == (kept_from, windows) and kept["draws"] <= 4 * 64
    again = ray.get(mixture.draw.remote(np.arange(200, 260)))  # a restart from the oldest kept checkpoint
    np.testing.assert_array_equal(again["input_ids"], first["input_ids"][200:260])
    with pytest.raises(ray.exceptions.RayTaskError, match="sample 150 precedes sample 200"):
        ray.get(mixture.draw.remote(np.arange(150, 160)))
    # a group restarted from 250 writes the checkpoint at 300 again, and again: nothing more is released
    for _ in range(3):
        ray.get(mixture.state_at.remote(300))
        assert ray.get(mixture.retained.remote())["start"] == 200
    pool = {n: Packed(np.zeros((1, 64), np.int32), np.full(1, 2, np.int32), 0) for n in "ab"}
    resumed = Mixture.remote(MixtureSpec(ray.get(mixture.state_at.remote(300)), specs, recipe, pool, 2, 0.0))  # a resumed run
    np.testing.assert_array_equal(ray.get(resumed.draw.remote(np.arange(300, 400)))["input_ids"],
                                  ray.get(reference.draw.remote(np.arange(300, 400)))["input_ids"])


def test_a_bad_record_met_while_drawing_is_one_line_naming_its_file_and_line(ray_cluster, smollm2_dir, tmp_path):
    """What the driver polls to stop a run that meets a bad record after training started."""
    from distillation.data.sources import open_source

    specs, recipe, pool = jsonl_mixture_inputs(tmp_path, smollm2_dir)
    bad = specs["b"].units[-1].path  # a file the first draws do not need
    lines = open(bad).read().splitlines()
    lines[7] = "{broken"
    open(bad, "w").write("\n".join(lines) + "\n")
    specs["b"] = open_source("b", "jsonl", str(tmp_path / "b"), "unused")
    plan = MixturePlan(["a", "b"], [len(specs[n].units) for n in "ab"], weights=[0.5, 0.5], seed=0,
                       samples_per_step=8, window=2)
    mixture = Mixture.remote(MixtureSpec(plan.state(), specs, recipe, pool, 2, 0.0))
    assert ray.get(mixture.failure.remote()) is None
    with pytest.raises(ray.exceptions.RayTaskError, match=f"{bad}:8: not valid JSON"):
        ray.get(mixture.draw.remote(np.arange(0, 2000)))  # every unit of both sources
    assert ray.get(mixture.failure.remote()).startswith(f"{bad}:8: not valid JSON")
