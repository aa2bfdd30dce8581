"""The mixture: the seeded plan (weights, exact resume, scheduled updates) and the actor that serves it."""

import json

import numpy as np
import pytest
import ray

from distillation.data.mixture import Mixture, MixturePlan, validate_weights
from distillation.errors import DistillError


def _plan(**kw):
    args = dict(names=["a", "b"], sizes=[50, 200], weights=[0.25, 0.75], seed=3, samples_per_step=10)
    return MixturePlan(**{**args, **kw})


def test_plan_is_seeded_follows_weights_and_visits_without_replacement():
    draws = _plan().draw(4000)
    assert draws == _plan().draw(4000)
    assert abs(np.mean([s for s, _ in draws]) - 0.75) < 0.03
    first_epoch = [i for s, i in draws if s == 0][:50]
    assert sorted(first_epoch) == list(range(50))


def test_plan_resumes_from_its_state_exactly_including_weight_updates():
    whole = _plan(update_steps=[5], delay=2)
    whole.set_weights(5, [0.9, 0.1])
    expected = whole.draw(300)
    first = _plan(update_steps=[5], delay=2)
    part = first.draw(40)
    resumed = MixturePlan.from_state(json.loads(json.dumps(first.state())))  # through JSON, as in a checkpoint
    resumed.set_weights(5, [0.9, 0.1])
    assert part + resumed.draw(300) == expected


def test_plan_refuses_to_draw_past_a_missing_update_and_ignores_a_repeated_one():
    plan = _plan(update_steps=[5], delay=2)
    plan.draw(70)  # steps 0..6: step 7 is the first that needs the update of step 5
    with pytest.raises(DistillError, match="update of step 5"):
        plan.draw(71)
    assert plan.set_weights(5, [1, 0]) and not plan.set_weights(5, [0, 1])
    assert {s for s, _ in plan.draw(200)[-100:]} == {0}
    with pytest.raises(DistillError, match="no weight update is scheduled"):
        plan.set_weights(6, [1, 0])


def test_weights_are_relative_but_must_be_non_negative_and_not_all_zero():
    assert validate_weights([1, 3], ["a", "b"]).tolist() == [0.25, 0.75]
    for bad in ([0, 0], [1, -1], [1, float("nan")], [1]):
        with pytest.raises(DistillError, match="non-negative, not all zero and one per source"):
            validate_weights(bad, ["a", "b"])


def test_mixture_actor_proportions_follow_an_update_from_the_next_step_on(ray_cluster):
    """The running pipeline reads weights from the actor: measure what it draws before and after."""
    plan = MixturePlan(["a", "b"], [100, 100], [0.5, 0.5], seed=0, samples_per_step=100, update_steps=[10], delay=1)
    rows = {n: np.arange(100 * 4, dtype=np.int32).reshape(100, 4) for n in "ab"}
    lengths = {n: np.full(100, 4, dtype=np.int32) for n in "ab"}
    mixture = Mixture.remote(plan.state(), rows, lengths)
    before = ray.get(mixture.draw.remote(np.arange(0, 1000)))["source"]
    pending = mixture.draw.remote(np.arange(1100, 1200))  # step 11 needs the update of step 10
    assert not ray.wait([pending], timeout=1.0)[0]  # ... so it waits for it
    ray.get(mixture.set_weights.remote(10, [0.1, 0.9]))
    ray.get(pending)
    after = ray.get(mixture.draw.remote(np.arange(1100, 3000)))["source"]
    assert abs(before.mean() - 0.5) < 0.05 and abs(after.mean() - 0.9) < 0.03
    batch = ray.get(mixture.draw.remote(np.array([5, 6])))
    assert batch["input_ids"].shape == (2, 4) and batch["length"].tolist() == [4, 4]
    replay = MixturePlan.from_state(ray.get(mixture.state_at.remote(1500)))
    assert replay.count == 1500 and replay.weights_at(20).tolist() == [0.1, 0.9]


def test_the_mixture_keeps_draws_back_to_the_checkpoint_two_before_the_latest_and_stays_exact(ray_cluster):
    plan = MixturePlan(["a", "b"], [50, 70], [0.3, 0.7], seed=3, samples_per_step=10, update_steps=[4], delay=1)
    rows = {n: np.arange(70 * 2, dtype=np.int32).reshape(70, 2)[:size] for n, size in (("a", 50), ("b", 70))}
    lengths = {"a": np.full(50, 2, np.int32), "b": np.full(70, 2, np.int32)}
    mixture = Mixture.remote(plan.state(), rows, lengths)
    whole = MixturePlan.from_state(plan.state())  # the reference: one plan that never forgets
    ray.get(mixture.draw.remote(np.arange(0, 50)))
    ray.get(mixture.set_weights.remote(4, [0.9, 0.1]))
    whole.set_weights(4, [0.9, 0.1])
    first = ray.get(mixture.draw.remote(np.arange(0, 300)))
    assert [tuple(p) for p in zip(first["source"], first["row"])] == whole.draw(300)
    for count, kept_from in ((100, 0), (200, 0), (250, 100), (300, 200)):  # checkpoints at these counts
        state = ray.get(mixture.state_at.remote(count))
        reference = MixturePlan.from_state(plan.state())
        reference.set_weights(4, [0.9, 0.1])
        reference.draw(count)
        assert state == reference.state()  # exact, whatever was released
        assert ray.get(mixture.retained.remote()) == {"start": kept_from, "draws": 300 - kept_from}
    again = ray.get(mixture.draw.remote(np.arange(200, 260)))  # a restart from the oldest kept checkpoint
    np.testing.assert_array_equal(again["source"], first["source"][200:260])
    with pytest.raises(ray.exceptions.RayTaskError, match="sample 150 precedes sample 200"):
        ray.get(mixture.draw.remote(np.arange(150, 160)))
    # a group restarted from 250 writes the checkpoint at 300 again, and again: nothing more is released
    for _ in range(3):
        ray.get(mixture.state_at.remote(300))
        assert ray.get(mixture.retained.remote())["start"] == 200
