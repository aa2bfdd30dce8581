"""Attention-relation distillation L_AD (MiniLMv2 style) on the Q, K and V states of one layer.

For each of Q, K, V and for each model separately: the states [B, T, W] (heads concatenated, W =
heads x head_dim, so GQA keys/values have their own smaller W) are re-split into `split_heads`
relation heads of width W / split_heads, L2-normalised along that width, and turned into relations
R = softmax_row(X X^T / temperature) of shape [B, split_heads, T, T]. Because relations are T x T,
teacher and student may differ in width, head count and grouped-query layout.

Normalisation. For each of Q, K, V: KL(R_teacher || R_student) per row, averaged over the valid rows
of every relation head and sequence (`F.kl_div(..., reduction="batchmean")` over [B*heads*T, T] rows in
the official code); the three are summed. Then:
- `reference` (default): divided by `split_heads`, as the official BitDistill trainer does
  (microsoft/BitNet PR #382, `compute_distill_loss`, which divides the sum by layers * split_heads;
  one layer here). gamma = 1e5 is calibrated against this.
- `paper`: no division (the paper's Eq. 11). The same training signal needs gamma / split_heads
  (1e5 reference == 3125 paper at split_heads = 32).
Padding positions contribute neither rows nor columns. In packed rows (`segments`, the document of
each token) a token's relations are over the tokens of its own document only, so a packed row gives
the loss its documents would give as rows of their own.
"""

from typing import Mapping, Optional

import torch

from distillation.losses.chunking import attach_grad

QKV = ("q", "k", "v")
NORMALIZATIONS = ("reference", "paper")
_EPS = 1e-12  # F.normalize's


def _split(states: torch.Tensor, split_heads: int, name: str) -> torch.Tensor:
    """[b, T, W] -> [b, split_heads, T, W / split_heads] in fp32."""
    batch, length, width = states.shape
    if width % split_heads:
        raise ValueError(f"{name} width {width} is not divisible by split_heads={split_heads}; "
                         f"choose a split_heads that divides every Q/K/V width")
    return states.float().view(batch, length, split_heads, width // split_heads).transpose(1, 2)


def _relation_logprobs(x: torch.Tensor, temperature: float, allowed: Optional[torch.Tensor],
                       dtype: torch.dtype) -> torch.Tensor:
    """log softmax_row(x x^T / temperature) of unit rows `x`, the matmul in `dtype`, the softmax in
    fp32; `allowed` [b, 1 or T, T]: which keys each query row may relate to."""
    xc = x.to(dtype)
    scores = (xc @ xc.transpose(-1, -2)).float().div_(temperature)
    if allowed is not None:
        scores.masked_fill_(~allowed[:, None], torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def _key_loss(teacher: torch.Tensor, student: torch.Tensor, split_heads: int, temperature: float,
              allowed: Optional[torch.Tensor], row_weight: torch.Tensor, dtype: torch.dtype, want_grad: bool,
              key: str):
    """sum over rows of row_weight * KL(R_teacher || R_student) for one of Q/K/V of a chunk of
    sequences, and its gradient w.r.t. the student's states, analytically: with R_s = softmax(S),
    S = x x^T / tau and x = u / |u| per relation head, dL/dS = w (R_s - R_t), dL/dx = (G + G^T) x / tau
    and dL/du = (dx - x (x . dx)) / |u|. Three [T, T] temporaries per relation head, where autograd
    keeps about six."""
    t_lp = _relation_logprobs(torch.nn.functional.normalize(_split(teacher, split_heads, f"teacher {key}"), dim=-1),
                              temperature, allowed, dtype)
    u = _split(student, split_heads, f"student {key}")
    norm = u.norm(dim=-1, keepdim=True).clamp_(min=_EPS)
    x = u / norm
    s_lp = _relation_logprobs(x, temperature, allowed, dtype)
    p = t_lp.exp()
    weight = row_weight[:, None, :, None]  # [b, 1, T, 1]
    value = (p * (t_lp - s_lp)).sum(-1, keepdim=True).mul_(weight).sum()
    del t_lp
    if not want_grad:
        return value, None
    g = s_lp.exp_().sub_(p).mul_(weight)  # dL/dS, reusing the student's buffer
    del p
    gc, xc = g.to(dtype), x.to(dtype)
    dx = (gc @ xc).float().add_((gc.transpose(-1, -2) @ xc).float()).div_(temperature)
    du = (dx - x * (x * dx).sum(-1, keepdim=True)).div_(norm)
    return value, du.transpose(1, 2).reshape(student.shape)


# On a GPU, compiled where `student.compile` is on (experiment=gpu): generated kernels fuse the
# elementwise runs (exp, subtract, weight, the KL's product) instead of a pass over memory per [T, T]
# temporary; `student.build.set_compile(False)` holds it eager like every torch.compile'd function.
# On CPU always eager: compiling gave the quantizers no gain there (README) and costs ~20 s a shape.
_key_loss_compiled = torch.compile(_key_loss)


def attention_relation_loss(teacher: Mapping[str, torch.Tensor], student: Mapping[str, torch.Tensor],
                            split_heads: int, temperature: float = 1.0, mask: Optional[torch.Tensor] = None,
                            chunk_sequences: int = 2, normalization: str = "reference",
                            segments: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32
                            ) -> torch.Tensor:
    """Sum over q, k, v of the mean row KL(R_teacher || R_student), divided by `split_heads` under the
    `reference` normalisation (module docstring); `mask` [B, T] marks real tokens, `segments` [B, T]
    the document of each token in packed rows; `dtype` the relation matmuls' (training's autocast
    dtype; the softmax statistics stay fp32).

    Computed `chunk_sequences` sequences at a time with the gradient taken in the forward pass (see
    chunking.py), so the [B, heads, T, T] relations exist for one chunk only. torch has no fused
    kernel for relation KL, hence our own.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"attention normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if chunk_sequences <= 0:
        raise ValueError(f"chunk_sequences must be positive, got {chunk_sequences}")
    batch, length = student["q"].shape[:2]
    device = student["q"].device
    rows_per_key = (mask.sum() if mask is not None else torch.tensor(batch * length)).float() * split_heads
    if normalization == "reference":
        rows_per_key = rows_per_key * split_heads
    rows_per_key = rows_per_key.clamp(min=1.0).to(device)
    inputs = [student[key] for key in QKV]
    want_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    grads = [torch.empty_like(x) if want_grad else None for x in inputs]
    total = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, batch, chunk_sequences):
        rows = slice(start, start + chunk_sequences)
        chunk_mask = mask[rows] if mask is not None else None
        allowed = chunk_mask[:, None, :].bool() if chunk_mask is not None else None
        if segments is not None:
            same = segments[rows][:, :, None] == segments[rows][:, None, :]
            allowed = same if allowed is None else same & allowed
        real = chunk_mask.float() if chunk_mask is not None else torch.ones(inputs[0][rows].shape[:2], device=device)
        row_weight = real / rows_per_key
        key_loss = _key_loss_compiled if device.type == "cuda" else _key_loss
        for key, s_states, grad in zip(QKV, inputs, grads):
            value, du = key_loss(teacher[key][rows].detach(), s_states[rows].detach(), split_heads, temperature,
                                 allowed, row_weight, dtype, want_grad, key)
            total += value
            if grad is not None:
                grad[rows] = du.to(grad.dtype)
    return attach_grad(total, inputs, grads) if want_grad else total
