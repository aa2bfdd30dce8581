"""Losses computed in chunks, each chunk's gradient taken in the forward pass.

Keeping d(loss)/d(input) (the size of the input) instead of every intermediate tensor autograd would
save is what bounds memory: the big temporaries (tokens x vocab log-probabilities, T x T relations)
exist for one chunk at a time. The gradient is exact, the same as the unchunked loss's. torch has
no such fused kernel for KL against sparse targets or for Q/K/V relations, hence this helper; the
losses (logits.py, attention.py) write their gradients analytically and attach them here.
"""

from typing import Sequence

import torch


class _PrecomputedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, grads, *inputs):
        # Held on ctx rather than save_for_backward (they are neither inputs nor outputs), so backward
        # can drop the last reference and autograd takes the buffer as `.grad` instead of copying it.
        ctx.grads = list(grads)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        # In place: the buffer is used once (no double backward), and a scaled copy would double
        # the memory this module exists to save.
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("chunked loss: backward ran twice; its gradient buffer is used up")
        return (None, None, *[g.mul_(grad_out) if g is not None else None for g in grads])


def attach_grad(value: torch.Tensor, inputs: Sequence[torch.Tensor], grads: Sequence) -> torch.Tensor:
    """`value` as a differentiable function of `inputs` whose gradient is the precomputed `grads`."""
    return _PrecomputedGrad.apply(value, list(grads), *inputs)
