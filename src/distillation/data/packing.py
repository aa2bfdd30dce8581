"""Cutting tokenized documents into fixed-length training rows, one document per row.

A row never holds two documents, so no token attends across a document boundary and positions
start at 0 with every row (the teacher sees exactly the same rows, so both sides agree). A document
longer than a row is cut into consecutive rows; the last piece, and any document shorter than a
row, is padded on the right and its padding carries no label (causal attention means real tokens
never see the padding either). A piece of one token has no next token to predict: it is dropped
and counted, never silently.
"""

from typing import List, NamedTuple, Optional

import numpy as np
import torch

from distillation.losses import IGNORE_INDEX


class Packed(NamedTuple):
    rows: np.ndarray  # [N, seq_len] int32, right-padded with `pad_id`
    lengths: np.ndarray  # [N] int32, real tokens per row (>= 2)
    dropped_tokens: int  # in one-token pieces, or beyond the token budget


def pack(token_lists: List[np.ndarray], pad_id: int, seq_len: int, max_tokens: Optional[int] = None) -> Packed:
    """Rows of the documents in order, up to `max_tokens` real tokens if given."""
    rows, lengths, dropped, taken = [], [], 0, 0
    max_tokens = 10**18 if max_tokens is None else max_tokens
    for tokens in token_lists:
        tokens = np.asarray(tokens, dtype=np.int32)
        for start in range(0, len(tokens), seq_len):
            piece = tokens[start:start + seq_len]
            if len(piece) < 2 or taken >= max_tokens:
                dropped += len(piece)
                continue
            row = np.full(seq_len, pad_id, dtype=np.int32)
            row[:len(piece)] = piece
            rows.append(row)
            lengths.append(len(piece))
            taken += len(piece)
    if not rows:
        return Packed(np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32), dropped)
    return Packed(np.stack(rows), np.asarray(lengths, dtype=np.int32), dropped)


def full_rows(token_lists: List[np.ndarray], seq_len: int, count: Optional[int] = None) -> np.ndarray:
    """The first `count` (default: all) rows with no padding, for benchmarks that compare like with like."""
    packed = pack(token_lists, 0, seq_len)
    rows = packed.rows[packed.lengths == seq_len][:count]
    if count is not None and len(rows) < count:
        raise ValueError(f"only {len(rows)} full rows of {seq_len} tokens; {count} wanted")
    return rows


def next_token_labels(input_ids: torch.Tensor, lengths: torch.Tensor = None) -> torch.Tensor:
    """labels[t] = input_ids[t + 1] where token t + 1 is real; the rest is IGNORE_INDEX."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if lengths is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        labels[positions[None, :] >= lengths.to(input_ids.device)[:, None] - 1] = IGNORE_INDEX
    return labels


def token_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, seq_len] bool: True on real tokens."""
    return torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]


def predicted_bytes(packed: Packed, tokenizer) -> int:
    """UTF-8 bytes of the predicted tokens of every row (positions 1 .. length-1): the denominator of
    bits per byte, the same for the held-out split and for `distill eval`."""
    return sum(len(tokenizer.decode(row[1:n]).encode("utf-8")) for row, n in zip(packed.rows, packed.lengths))
