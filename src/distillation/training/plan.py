"""What the driver hands every training worker (`WorkerPlan`), and the settings both sides derive
from the config the same way (the loss weights, whether a teacher is needed, the influence schedule)."""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from distillation.losses import LossWeights
from distillation.models import ModelSource


@dataclass
class WorkerPlan:
    """The one message from the driver to `train_loop_per_worker` (Ray Train's `train_loop_config`)."""

    cfg: dict  # the resolved run configuration, as a plain container
    mixture: str  # the named Mixture actor the worker's pipeline draws from
    board: Optional[str]  # the named MetricsBoard actor (metrics, ledger, stop requests)
    app_name: Optional[str]  # the teacher's Serve application; None when the loss needs no teacher
    teacher_model: ModelSource  # for the frozen output head of the hidden-state signal (resolved on the worker's node)
    student_model: Optional[ModelSource]  # the student's stage-1 weights, pinned (None: a saved student's path)
    vocab_size: int  # the shared real vocabulary (vocab.check_vocab)
    probe: Tuple[np.ndarray, np.ndarray]  # influence probe rows and lengths
    eval: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # held-out rows per source


def loss_weights(dcfg=None, **overrides) -> LossWeights:
    """The loss's settings from `distillation.*` (the schema's defaults when `dcfg` is None), with
    `overrides` on top."""
    if dcfg is None:
        from distillation.config.schema import DistillationConfig

        dcfg = dataclasses.asdict(DistillationConfig())
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LossWeights)}
    if unknown:
        raise TypeError(f"unknown loss settings {sorted(unknown)}")
    return LossWeights(**{f.name: overrides.get(f.name, dcfg[f.name]) for f in dataclasses.fields(LossWeights)})


def needs_teacher(dcfg) -> bool:
    return dcfg.logits_weight > 0 or dcfg.attention_weight > 0


def influence_steps(icfg, max_steps: int) -> list:
    """Optimizer steps after which influence moves the mixture weights (only those whose update
    takes effect before the run ends)."""
    if not icfg.enabled:
        return []
    return list(range(icfg.update_interval, max_steps - icfg.delay_steps, icfg.update_interval))
