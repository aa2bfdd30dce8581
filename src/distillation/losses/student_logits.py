"""Where the loss reads the student's logits from, one chunk of tokens at a time, and where their
gradient goes: given logits (`_DenseLogits`), or the final hidden states and the output head
(`HeadInputs`, `_FusedLogits`), whose chunk of logits is computed here and whose gradient is taken
through the head's matmul by hand, so the [tokens, vocab] logits never exist (as `HiddenTargets`
does for the teacher)."""

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F


@dataclass
class HeadInputs:
    """The student's final hidden states and its output head (an nn.Linear's weight and bias) in place
    of its logits: the loss computes the logits one chunk at a time, so neither the [tokens, vocab]
    logits nor their gradient ever exist whole (as `HiddenTargets` does for the teacher side). The
    matmuls run in `dtype` (training's autocast dtype), the softmax statistics in fp32."""

    hidden: torch.Tensor  # [B, T, H]
    weight: torch.Tensor  # [V', H], V' >= vocab_size (a head padded beyond the shared vocabulary)
    bias: Optional[torch.Tensor]
    vocab_size: int
    dtype: torch.dtype = torch.float32


class _DenseLogits:
    """Chunks of given logits [..., V]; their gradient goes into one buffer in the logits' dtype."""

    def __init__(self, logits: torch.Tensor):
        self.flat = logits.reshape(-1, logits.shape[-1])
        self.inputs = [logits]
        self.requires_grad = logits.requires_grad
        self.grad: Optional[torch.Tensor] = None

    def start_grad(self) -> None:
        self.grad = torch.empty_like(self.flat)

    def chunk(self, rows: slice) -> torch.Tensor:
        return self.flat[rows].detach().float()

    def chunk_grad(self, rows: slice, x: torch.Tensor) -> torch.Tensor:
        assert self.grad is not None
        # fp32 logits: accumulate straight into the buffer; else in an fp32 chunk
        return self.grad[rows].zero_() if self.grad.dtype == torch.float32 else torch.zeros_like(x)

    def put_grad(self, rows: slice, grad: torch.Tensor) -> None:
        assert self.grad is not None
        if grad.data_ptr() != self.grad[rows].data_ptr():
            self.grad[rows] = grad.to(self.grad.dtype)

    def grads(self) -> list:
        assert self.grad is not None
        return [self.grad.view_as(self.inputs[0])]


class _FusedLogits:
    """Chunks of hidden @ weight^T + bias, computed here; the gradient goes to the hidden states and
    the head's parameters (weight rows past `vocab_size` get none, as when the logits are sliced)."""

    def __init__(self, head: HeadInputs):
        self.head = head
        self.hidden = head.hidden.reshape(-1, head.hidden.shape[-1]).detach().to(head.dtype)
        self.weight = head.weight[:head.vocab_size].detach().to(head.dtype)
        self.bias = head.bias[:head.vocab_size].detach().to(head.dtype) if head.bias is not None else None
        self.inputs = [head.hidden, head.weight] + ([head.bias] if head.bias is not None else [])
        self.requires_grad = any(t.requires_grad for t in self.inputs)
        self.grad_hidden: Optional[torch.Tensor] = None
        self.grad_weight: Optional[torch.Tensor] = None
        self.grad_bias: Optional[torch.Tensor] = None

    def start_grad(self) -> None:
        self.grad_hidden = torch.empty(self.hidden.shape, dtype=self.head.hidden.dtype, device=self.hidden.device)
        self.grad_weight = torch.zeros_like(self.head.weight)
        self.grad_bias = torch.zeros_like(self.head.bias) if self.head.bias is not None else None

    def chunk(self, rows: slice) -> torch.Tensor:
        return F.linear(self.hidden[rows], self.weight, self.bias).float()

    def chunk_grad(self, rows: slice, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def put_grad(self, rows: slice, grad: torch.Tensor) -> None:
        assert self.grad_hidden is not None and self.grad_weight is not None
        vocab, g = self.head.vocab_size, grad.to(self.weight.dtype)
        self.grad_hidden[rows] = (g @ self.weight).to(self.grad_hidden.dtype)
        if self.grad_weight.dtype == g.dtype:  # in place: no [vocab, hidden] temporary per chunk
            self.grad_weight[:vocab].addmm_(g.T, self.hidden[rows])
        else:
            self.grad_weight[:vocab] += (g.T @ self.hidden[rows]).to(self.grad_weight.dtype)
        if self.grad_bias is not None:
            self.grad_bias[:vocab] += grad.sum(0).to(self.grad_bias.dtype)

    def grads(self) -> list:
        assert self.grad_hidden is not None and self.grad_weight is not None
        return [self.grad_hidden.view_as(self.head.hidden), self.grad_weight] + (
            [self.grad_bias] if self.grad_bias is not None else [])


def logit_source(student: Union[torch.Tensor, HeadInputs]):
    return _FusedLogits(student) if isinstance(student, HeadInputs) else _DenseLogits(student)
