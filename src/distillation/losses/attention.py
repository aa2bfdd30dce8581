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
import torch.nn.functional as F

from distillation.losses.chunking import chunked_loss

QKV = ("q", "k", "v")
NORMALIZATIONS = ("reference", "paper")


def _relation_logprobs(states: torch.Tensor, split_heads: int, temperature: float,
                       allowed: Optional[torch.Tensor], name: str) -> torch.Tensor:
    """`allowed` [B, 1 or T, T]: which keys each query row may relate to."""
    batch, length, width = states.shape
    if width % split_heads:
        raise ValueError(f"{name} width {width} is not divisible by split_heads={split_heads}; "
                         f"choose a split_heads that divides every Q/K/V width")
    x = states.float().view(batch, length, split_heads, width // split_heads).transpose(1, 2)
    x = F.normalize(x, dim=-1)
    scores = x @ x.transpose(-1, -2) / temperature
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def attention_relation_loss(teacher: Mapping[str, torch.Tensor], student: Mapping[str, torch.Tensor],
                            split_heads: int, temperature: float = 1.0, mask: Optional[torch.Tensor] = None,
                            chunk_sequences: int = 2, normalization: str = "reference",
                            segments: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over q, k, v of the mean row KL(R_teacher || R_student), divided by `split_heads` under the
    `reference` normalisation (module docstring); `mask` [B, T] marks real tokens, `segments` [B, T]
    the document of each token in packed rows.

    Computed `chunk_sequences` sequences at a time (see chunking.py), so the [B, heads, T, T]
    relations exist for one chunk only.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"attention normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    batch, length = student["q"].shape[:2]
    rows_per_key = (mask.sum() if mask is not None else torch.tensor(batch * length)).float() * split_heads
    if normalization == "reference":
        rows_per_key = rows_per_key * split_heads
    rows_per_key = rows_per_key.clamp(min=1.0).to(student["q"].device)

    def chunk(rows: slice):
        def fn(*student_states):
            chunk_mask = mask[rows] if mask is not None else None
            allowed = chunk_mask[:, None, :] if chunk_mask is not None else None
            if segments is not None:
                same = segments[rows][:, :, None] == segments[rows][:, None, :]
                allowed = same if allowed is None else same & allowed
            total = student_states[0].new_zeros(())
            for key, s_states in zip(QKV, student_states):
                t_lp = _relation_logprobs(teacher[key][rows], split_heads, temperature, allowed, f"teacher {key}")
                s_lp = _relation_logprobs(s_states, split_heads, temperature, allowed, f"student {key}")
                row_kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)  # [b, H, T]
                if chunk_mask is not None:
                    row_kl = row_kl * chunk_mask[:, None, :].to(row_kl.dtype)
                total = total + row_kl.sum() / rows_per_key
            return total
        return rows, fn

    if chunk_sequences <= 0:
        raise ValueError(f"chunk_sequences must be positive, got {chunk_sequences}")
    chunks = (chunk(slice(start, start + chunk_sequences)) for start in range(0, batch, chunk_sequences))
    return chunked_loss([student[key] for key in QKV], chunks)
