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
