"""Held-out loss: mean next-token cross-entropy (nats/token) and bits per byte of the raw text."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from distillation.data.packing import Packed, next_token_labels
from distillation.losses import IGNORE_INDEX


@torch.inference_mode()
def heldout_loss(model: nn.Module, packed: Packed, num_bytes: int, batch_size: int = 4) -> dict:
    """`num_bytes`: UTF-8 bytes of the predicted tokens (positions 1 .. length-1 of every row)."""
    model.eval()
    total_nats, total_tokens = 0.0, 0
    for start in range(0, len(packed.rows), batch_size):
        ids = torch.as_tensor(packed.rows[start:start + batch_size], dtype=torch.long)
        labels = next_token_labels(ids, torch.as_tensor(packed.lengths[start:start + batch_size]))
        logits = model(input_ids=ids).logits.float()
        total_nats += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                      reduction="sum").item()
        total_tokens += int((labels != IGNORE_INDEX).sum())
    return {"loss": total_nats / max(total_tokens, 1), "tokens": total_tokens,
            "bits_per_byte": total_nats / math.log(2) / max(num_bytes, 1)}
