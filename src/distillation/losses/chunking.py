"""Losses computed in chunks, each chunk's gradient taken in the forward pass.

Keeping d(loss)/d(input) (the size of the input) instead of every intermediate tensor autograd would
save is what bounds memory: the big temporaries (tokens x vocab log-probabilities, T x T relations)
exist for one chunk at a time. The gradient is exact, the same as the unchunked loss's. torch has
no such fused kernel for KL against sparse targets or for Q/K/V relations, hence this helper.
"""

from typing import Callable, Iterable, Sequence, Tuple

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


def chunked_loss(inputs: Sequence[torch.Tensor], chunks: Iterable[Tuple[slice, Callable]]) -> torch.Tensor:
    """Sum over chunks of `fn(*inputs_rows)` where each chunk is (rows along dim 0, fn).

    `fn` gets fp32 leaf copies of the inputs' rows (requiring grad where the input does) and returns
    a scalar; its gradient is written into one buffer per input, in that input's dtype.
    """
    track = [x.requires_grad and torch.is_grad_enabled() for x in inputs]
    grads = [torch.zeros_like(x) if t else None for x, t in zip(inputs, track)]
    total = torch.zeros((), dtype=torch.float32, device=inputs[0].device)
    for rows, fn in chunks:
        leaves = [x[rows].detach().float().requires_grad_(t) for x, t in zip(inputs, track)]
        with torch.enable_grad():
            value = fn(*leaves)
            wanted = [leaf for leaf, t in zip(leaves, track) if t]
            parts = torch.autograd.grad(value, wanted, allow_unused=True) if wanted and value.requires_grad else []
        remaining = iter(parts)
        for grad, t in zip(grads, track):
            if t:
                part = next(remaining, None)
                if part is not None:
                    assert grad is not None  # a tracked input has a buffer
                    grad[rows] = part.to(grad.dtype)
        total += value.detach()
    return attach_grad(total, inputs, grads) if any(track) else total
