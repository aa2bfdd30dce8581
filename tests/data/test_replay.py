"""The mixture's replay of earlier draws and its release of what no restart can ask for, alone: a
plan whose block sizes are a fixed function (a stand-in for reading them), no Ray."""

import json

import numpy as np
import pytest

from distillation.data.mixture import MixturePlan
from distillation.data.replay import KEPT_WINDOWS, ReleasePolicy, ReplayWindow
from distillation.errors import DistillError

WINDOW = 64


def _rows(key):
    """A fixed, uneven row count per block, empty blocks included."""
    source, epoch, block = key
    return (7 * source + 3 * epoch + 5 * block) % 11


def _plan():
    plan = MixturePlan(["a", "b"], [5, 12], [0.25, 0.75], seed=3, samples_per_step=10, update_steps=[4], delay=1,
                       window=4)
    plan.set_weights(4, [0.9, 0.1])
    return plan


def _drawn(count):
    """Samples 0 .. count-1 of a plan drawn straight through, and its state after them."""
    plan, out = _plan(), []
    while plan.count < count:
        drawn, missing = plan.draw(count, _rows)
        assert missing is None
        out += drawn
    return out, plan.state()


def _replay(count, plan=None):
    replay = ReplayWindow(plan or _plan(), _rows, WINDOW)
    while replay.plan.count < count:
        assert replay.advance(count) is None
        assert replay.plan.count <= replay.current_start + WINDOW  # never past a window's end
    return replay


def test_an_evicted_windows_draws_are_drawn_again_equal_to_the_first_draws():
    reference, _ = _drawn(1000)
    replay = _replay(1000)
    assert replay.current_start == 960 and list(replay.windows) == [768, 832, 896]  # 0 .. 767 were evicted
    assert replay.held() == len(replay.current) + KEPT_WINDOWS * WINDOW
    assert sorted(replay.cursors) == list(range(0, 1000, WINDOW))
    assert replay.addresses(np.arange(1000)) == reference
    assert replay.addresses(np.array([999, 3, 500, 3])) == [reference[i] for i in (999, 3, 500, 3)]
    assert len(replay.windows) == KEPT_WINDOWS


def test_a_state_drawn_again_equals_the_state_of_a_plan_that_drew_straight_there():
    replay = _replay(500)
    for count in (0, 63, 64, 65, 300, 500):
        assert replay.state_at(count) == _drawn(count)[1]
    with pytest.raises(DistillError, match="state at 501 is past sample 500, the last drawn"):
        replay.state_at(501)
    with pytest.raises(DistillError, match="needs block .* never read"):  # a replay never reads a block
        ReplayWindow(_plan(), lambda key: None, WINDOW).redraw(_plan(), 10)


def test_the_third_checkpoint_releases_what_precedes_the_first_of_the_three():
    reference, _ = _drawn(300)
    replay = _replay(300)
    policy = ReleasePolicy(replay)
    for count, start, windows in ((100, 0, 5), (200, 0, 5), (250, 100, 4), (300, 200, 2)):
        assert policy.state_at(count) == _drawn(count)[1]  # exact, whatever was released before
        assert (policy.start, len(replay.cursors)) == (start, windows)
        assert all(w + WINDOW > start for w in list(replay.cursors) + list(replay.windows))
    policy.check_kept(np.arange(200, 260))  # a restart from the oldest kept checkpoint
    assert replay.addresses(np.arange(200, 260)) == reference[200:260]
    with pytest.raises(DistillError, match="sample 150 precedes sample 200"):
        policy.check_kept(np.arange(150, 160))
    with pytest.raises(DistillError, match="state at 150 precedes sample 200, the earliest this mixture keeps"):
        policy.state_at(150)


def test_a_restarted_group_asking_again_for_counts_it_asked_before_releases_nothing_more():
    replay = _replay(400)
    policy = ReleasePolicy(replay)
    for count in (100, 200, 250, 300):
        policy.state_at(count)
    assert policy.start == 200
    for _ in range(3):  # a group restarted from 250 writes the checkpoint at 300 again, and again
        policy.state_at(300)
        assert (policy.start, policy.checkpoints) == (200, [200, 250, 300])
    policy.state_at(250)  # one restarted from 200: 250 and 300 again
    policy.state_at(300)
    assert policy.start == 200
    policy.state_at(350)  # a new checkpoint: the first of the last three is as far back as a restart goes
    assert (policy.start, policy.checkpoints) == (250, [250, 300, 350])


def test_a_resumed_plan_keeps_nothing_before_where_it_resumed():
    _, state = _drawn(300)
    plan = MixturePlan.from_state(json.loads(json.dumps(state)))  # through JSON, as in a checkpoint
    replay = _replay(500, plan)
    policy = ReleasePolicy(replay)
    assert replay.origin == policy.start == 300 and sorted(replay.cursors) == [300, 364, 428, 492]
    assert replay.addresses(np.arange(300, 500)) == _drawn(500)[0][300:]
    with pytest.raises(DistillError, match="sample 299 precedes sample 300, where this run resumed"):
        policy.check_kept(np.array([299, 300]))
    assert policy.state_at(400) == _drawn(400)[1]
