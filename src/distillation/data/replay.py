"""What the mixture drew, served again by sample id in bounded memory, and how far back it must be
able to: a restarted worker asks again for samples its group drew before, and a checkpoint asks for
the plan's state at a count already passed.

Plain Python over a MixturePlan (data/mixture.py): the Mixture actor (roles/mixture.py) drives the
live plan through `ReplayWindow.advance` and asks `ReleasePolicy` for checkpoints' states.
"""

import copy
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import numpy as np

from distillation.data.mixture import Address, BlockKey, MixturePlan
from distillation.errors import DistillError

WINDOW_SAMPLES = 4096  # the actor keeps the plan's cursors every this many samples
KEPT_WINDOWS = 3  # earlier windows whose draws are held, besides the current one


class ReplayWindow:
    """The draws of the live plan by sample id. Holds the draws (4 ints each) of the current and a
    few recent windows of `window_samples` samples, and the plan's cursors at every window start
    from `origin` (where this plan was created or resumed). An older window's draws are drawn again
    from its cursors (the plan is deterministic; the blocks it passes are known: `rows` gives their
    row counts), and so is a checkpoint's state."""

    def __init__(self, plan: MixturePlan, rows: Callable[[BlockKey], Optional[int]],
                 window_samples: int = WINDOW_SAMPLES):
        self.plan, self.rows, self.window_samples = plan, rows, window_samples
        self.template = {k: v for k, v in plan.state().items() if k != "history"}  # fixed fields, for replays
        self.origin = plan.count
        self.cursors: Dict[int, dict] = {self.origin: plan.cursors()}  # at every window start
        self.current: List[Address] = []  # draws of the window that begins at current_start
        self.current_start = self.origin
        self.windows: "OrderedDict[int, List[Address]]" = OrderedDict()  # a few earlier windows' draws

    def window(self, count: int) -> int:
        """The start of the window sample `count` falls in."""
        return self.origin + (count - self.origin) // self.window_samples * self.window_samples

    def plan_at(self, window: int) -> MixturePlan:
        return MixturePlan.from_state({**self.template, **self.cursors[window],
                                       "history": copy.deepcopy(self.plan.history)})

    def redraw(self, plan: MixturePlan, count: int) -> List[Address]:
        drawn, missing = plan.draw(count, self.rows)
        if missing is not None:  # every block it passes was read when these samples were first drawn
            raise DistillError(f"replaying the mixture to sample {count} needs block {missing}, never read")
        return drawn

    def advance(self, count: int) -> Optional[BlockKey]:
        """Draw with the live plan towards `count`, stopping at the current window's end (keeping the
        cursors there) or before a block not read yet, whose key it returns."""
        boundary = self.current_start + self.window_samples
        drawn, missing = self.plan.draw(min(count, boundary), self.rows)
        self.current.extend(drawn)
        if self.plan.count == boundary:
            self.cursors[boundary] = self.plan.cursors()
            self._keep(self.current_start, self.current)
            self.current, self.current_start = [], boundary
        return missing

    def addresses(self, ids: np.ndarray) -> List[Address]:
        """The draws of samples `ids` (all drawn already), an evicted window's drawn again."""
        out = []
        for i in ids.tolist():
            window = self.window(i)
            if window == self.current_start:
                out.append(self.current[i - window])
                continue
            if window not in self.windows:
                self._keep(window, self.redraw(self.plan_at(window), window + self.window_samples))
            self.windows.move_to_end(window)
            out.append(self.windows[window][i - window])
        return out

    def _keep(self, window: int, draws: List[Address]) -> None:
        self.windows[window] = draws
        while len(self.windows) > KEPT_WINDOWS:
            self.windows.popitem(last=False)

    def state_at(self, count: int) -> dict:
        """The plan's state after exactly `count` samples, drawn again from the cursors of its window."""
        if count > self.plan.count:
            raise DistillError(f"state at {count} is past sample {self.plan.count}, the last drawn")
        plan = self.plan_at(self.window(count))
        self.redraw(plan, count)
        return plan.state()

    def release(self, start: int) -> None:
        """Forget the windows that end before sample `start`."""
        for window in [w for w in self.cursors if w + self.window_samples <= start]:
            del self.cursors[window]
            self.windows.pop(window, None)

    def held(self) -> int:
        """Draws held in memory."""
        return len(self.current) + sum(len(w) for w in self.windows.values())


class ReleasePolicy:
    """How far back the mixture must still serve: `start`, the first sample kept. It begins where
    the run began or resumed (draws before it were consumed before a resume) and moves to the sample
    count of the checkpoint two before the latest: a worker group restarts from the latest registered
    checkpoint, and Ray Train registers one only after every rank reported it, so by the time a third
    checkpoint is being written the first of the three is as far back as a restart can go."""

    def __init__(self, replay: ReplayWindow):
        self.replay = replay
        self.start = replay.origin
        self.checkpoints: List[int] = []  # sample counts `state_at` was asked for, in order

    def check_kept(self, ids: np.ndarray) -> None:
        if len(ids) and ids.min() < self.start:
            raise DistillError(f"sample {ids.min()} precedes sample {self.start}, where this run resumed or the "
                               f"checkpoint a restart could still use begins")

    def state_at(self, count: int) -> dict:
        """The plan's state after exactly `count` samples (the consumed point of a checkpoint, which
        a resumed run continues from). Asked for a third checkpoint, it releases what precedes the
        first of the three."""
        state = self._replayed(count)
        # a restarted group asks again for counts it asked before: only the latest run of increasing
        # counts says how far back a restart can go
        self.checkpoints = [c for c in self.checkpoints if c < count][-2:] + [count]
        if len(self.checkpoints) >= 3 and self.checkpoints[-3] > self.start:
            self.start = self.checkpoints[-3]
            self.replay.release(self.start)
        return state

    def _replayed(self, count: int) -> dict:
        if count < self.start:
            raise DistillError(f"state at {count} precedes sample {self.start}, the earliest this mixture keeps")
        return self.replay.state_at(count)
