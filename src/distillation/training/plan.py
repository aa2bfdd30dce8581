"""Settings the driver and the workers derive from the configuration the same way: the loss
weights, whether a teacher is needed, the influence schedule."""

import dataclasses
from typing import List, Optional

from distillation.config.schema import DistillationConfig, InfluenceConfig
from distillation.losses import LossWeights


def loss_weights(d: Optional[DistillationConfig] = None, **overrides) -> LossWeights:
    """The loss's settings from `distillation.*` (the schema's defaults when `d` is None), with
    `overrides` on top."""
    d = d if d is not None else DistillationConfig()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LossWeights)}
    if unknown:
        raise TypeError(f"unknown loss settings {sorted(unknown)}")
    return LossWeights(**{f.name: overrides.get(f.name, getattr(d, f.name)) for f in dataclasses.fields(LossWeights)})


def needs_teacher(d: DistillationConfig) -> bool:
    return d.logits_weight > 0 or d.attention_weight > 0


def influence_steps(i: InfluenceConfig, max_steps: int) -> List[int]:
    """Optimizer steps after which influence moves the mixture weights (only those whose update
    takes effect before the run ends)."""
    if not i.enabled:
        return []
    return list(range(i.update_interval, max_steps - i.delay_steps, i.update_interval))
