"""Attention-relation distillation L_AD (MiniLMv2 style) on the Q, K and V states of one layer.

For each of Q, K, V and for each model separately: the states [B, T, W] (heads concatenated, W =
heads x head_dim, so GQA keys/values have their own smaller W) are re-split into `split_heads`
relation heads of width W / split_heads, L2-normalised along that width, and turned into relations
R = softmax_row(X X^T / temperature) of shape [B, split_heads, T, T]. Because relations are T x T,
teacher and student may differ in width, head count and grouped-query layout.

Normalisation (what gamma = 1e5 is calibrated against, as in the official BitDistill code with one
distilled layer): for each of Q, K, V, KL(R_teacher || R_student) per row, averaged over valid
rows, relation heads and batch; the three averages are summed. Padding positions contribute
neither rows nor columns.
"""

from typing import Mapping, Optional

import torch
import torch.nn.functional as F


def _relation_logprobs(states: torch.Tensor, split_heads: int, temperature: float,
                       key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    batch, length, width = states.shape
    if width % split_heads:
        raise ValueError(f"state width {width} is not divisible by split_heads={split_heads}")
    x = states.float().view(batch, length, split_heads, width // split_heads).transpose(1, 2)
    x = F.normalize(x, dim=-1)
    scores = x @ x.transpose(-1, -2) / temperature
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def attention_relation_loss(teacher: Mapping[str, torch.Tensor], student: Mapping[str, torch.Tensor],
                            split_heads: int, temperature: float = 1.0,
                            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over q, k, v of the mean row KL(R_teacher || R_student); `mask` [B, T] marks real tokens."""
    total = student["q"].new_zeros((), dtype=torch.float32)
    for key in ("q", "k", "v"):
        t_lp = _relation_logprobs(teacher[key], split_heads, temperature, mask)
        s_lp = _relation_logprobs(student[key], split_heads, temperature, mask)
        row_kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)  # [B, H, T]
        if mask is None:
            total = total + row_kl.mean()
        else:
            rows = mask[:, None, :].expand_as(row_kl).to(row_kl.dtype)
            total = total + (row_kl * rows).sum() / rows.sum().clamp(min=1.0)
    return total
