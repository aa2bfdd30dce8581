"""Each source's influence on a probe (target) set, from the student's own gradients. Plain torch.

Estimator (first order, after DoGE, Fan et al. 2024, and Influence Distillation, arXiv 2505.19051):
a small step along the gradient g_s of a batch from source s changes the probe loss by about
-lr * <g_s, g_probe>. Each source is scored by the cosine of g_s with g_probe, which does not depend
on the step size or on how loud a source's gradients are; scores are smoothed with an exponential
moving average and the weights move multiplicatively (exponentiated gradient, as in DoReMi):

    w_s <- w_s * exp(eta * score_s), renormalised, then mixed with uniform so none falls below `floor`.

Gradients are of the next-token cross-entropy (the student's own objective without the teacher),
so influence needs no teacher answers. Cost per update: (sources + 1) forward + backward passes of
`batch_size` sequences on one worker, and two parameter-sized fp32 vectors (under FSDP on every
worker, each holding its shard's vectors; the dot products and norms are summed across them).
"""

import math
from typing import List, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from distillation.data.packing import next_token_labels
from distillation.losses import IGNORE_INDEX
from distillation.models import forward_rows

Batch = Tuple[torch.Tensor, torch.Tensor, *Tuple[Optional[torch.Tensor], ...]]  # ids, lengths[, positions[, labelled]]


def flat_gradient(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor,
                  positions: Optional[torch.Tensor] = None, labelled: Optional[torch.Tensor] = None,
                  sharded: bool = False) -> torch.Tensor:
    """The gradient of the mean next-token CE over all trainable parameters, as one fp32 vector;
    `positions` for packed rows, `labelled` for records (data/packing.py). When `sharded` (FSDP2), this rank's shard of
    it, every rank passing the same rows.

    `torch.autograd.grad` leaves `.grad` (and so DDP's gradient hooks) untouched. A sharded student's
    gradients exist only through FSDP's own backward (it reduce-scatters into `.grad`), which is why
    that case runs `backward` and clears `.grad` after; the optimizer step has already used it."""
    params: List[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    logits = forward_rows(model, input_ids, positions).logits  # right padding: causal attention never sees it
    labels = next_token_labels(input_ids, lengths, positions, labelled)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    if sharded:
        loss.backward()
        # a sharded student's parameters and gradients are DTensors (torch types them Tensor)
        grads: Sequence[Optional[torch.Tensor]] = [None if p.grad is None else cast(DTensor, p.grad).to_local()
                                                   for p in params]
        model.zero_grad(set_to_none=True)
        params = [cast(DTensor, p).to_local() for p in params]
    else:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float() for g, p in zip(grads, params)])


def alignment_scores(model: nn.Module, probe: Batch, batches: Mapping[str, Batch]) -> dict:
    """Cosine of each source batch's gradient with the probe gradient; batches are (ids, lengths) or
    (ids, lengths, positions, labelled), either of the last two None. A sharded student's products
    are summed over its shards (all-reduce)."""
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    probe_grad = flat_gradient(model, *probe, sharded=sharded)
    scores = {}
    for name, batch in batches.items():
        grad = flat_gradient(model, *batch, sharded=sharded)
        sums = torch.stack([grad.double() @ probe_grad.double(), grad.double().square().sum(),
                            probe_grad.double().square().sum()])
        if sharded:
            dist.all_reduce(sums)
        dot, norm2, probe_norm2 = sums.tolist()
        scores[name] = dot / max(math.sqrt(norm2 * probe_norm2), 1e-12)
        del grad
    return scores


def move_weights(weights: Union[Sequence[float], np.ndarray], scores: Union[Sequence[float], np.ndarray], eta: float,
                 floor: float) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64) * np.exp(eta * np.asarray(scores, dtype=np.float64))
    w = w / w.sum()
    n = len(w)
    if not 0 <= floor * n <= 1:
        raise ValueError(f"influence.floor={floor} must be within [0, 1/{n}] for {n} sources")
    return (1 - floor * n) * w + floor


def smooth(previous: Sequence[float], scores: Sequence[float], beta: float) -> np.ndarray:
    """Exponential moving average of the scores (the first update has no `previous`: empty)."""
    current = np.asarray(scores, dtype=np.float64)
    return current if len(previous) == 0 else beta * np.asarray(previous, dtype=np.float64) + (1 - beta) * current
