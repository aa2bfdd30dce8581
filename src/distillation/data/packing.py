"""Packing tokenized documents into fixed-length training sequences.

Documents are joined with an EOS token between them and cut into rows of `seq_len`; attention
crosses document boundaries (standard pre-training packing), and every position whose next token
exists carries a label. The remainder shorter than a row is dropped and counted.
"""

from typing import List, Tuple

import numpy as np
import torch

from distillation.losses import IGNORE_INDEX


def pack(token_lists: List[np.ndarray], eos_id: int, seq_len: int, max_tokens: int) -> Tuple[np.ndarray, int]:
    """Return ([rows, seq_len] int32, tokens dropped at the end)."""
    pieces, total = [], 0
    for tokens in token_lists:
        pieces.append(np.asarray(tokens, dtype=np.int32))
        pieces.append(np.array([eos_id], dtype=np.int32))
        total += len(tokens) + 1
        if total >= max_tokens:
            break
    stream = np.concatenate(pieces)[:max_tokens] if pieces else np.zeros(0, np.int32)
    rows = len(stream) // seq_len
    return stream[: rows * seq_len].reshape(rows, seq_len), len(stream) - rows * seq_len


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """labels[t] = input_ids[t + 1]; the last position has no next token."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels
