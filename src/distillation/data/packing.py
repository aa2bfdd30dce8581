"""Cutting tokenized documents into fixed-length training rows.

`pack`: one document per row. A row never holds two documents, so positions start at 0 with every
row. A document longer than a row is cut into consecutive rows; the last piece, and any document
shorter than a row, is padded on the right and its padding carries no label (causal attention means
real tokens never see the padding either).

`pack_documents` (data.pack_documents): documents laid end to end, filling each row; one that does
not fit is continued in the next row. Each row carries `positions`, which restart at 0 where a
document (or its continuation) starts. Position ids are how transformers marks packed sequences
(`masking_utils.find_packed_sequence_indices`, used when no attention mask is given): attention
stays inside each document, and RoPE counts from each document's start. The labels and the
attention-relation loss use the same boundaries (`next_token_labels`, `segment_ids`), and the
teachers score each document on its own (`document_spans`), so the teacher sees exactly the rows
the student does. Padding continues the last document's positions: causal attention keeps it
invisible to real tokens, as in one-document rows.

Either way a piece of one token has no next token to predict: it is dropped and counted, never
silently.

Records (prompt/response, chat: data/records.py) come with a mask of the tokens the loss predicts
(`labelled`: the response, the assistant turns). A record is never cut: it fills a row of its own,
or in packed rows starts a new row when it does not fit the rest of one (rows.py refuses a record
longer than a row). Rows then carry `labelled` [N, seq_len]; a text document's tokens are all
labelled. Without records it is None and every real token is a label, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, NamedTuple, Optional

import numpy as np

from distillation.errors import DistillError

if TYPE_CHECKING:  # imported where rows become tensors: the mixture and the readers cut rows without torch
    import torch

IGNORE_INDEX = -100  # a label that is none (padding, prompts, document ends); what the losses skip


class Packed(NamedTuple):
    rows: np.ndarray  # [N, seq_len] int32, right-padded with `pad_id`
    lengths: np.ndarray  # [N] int32, real tokens per row (>= 2)
    dropped_tokens: int  # in one-token pieces, or beyond the token budget
    positions: Optional[np.ndarray] = None  # [N, seq_len] int32 for packed rows; None: one document per row
    labelled: Optional[np.ndarray] = None  # [N, seq_len] bool: tokens the loss predicts; None: every real one

    def take(self, index) -> "Packed":
        """The rows at `index` (an array of row numbers or a mask), every column kept."""
        return Packed(self.rows[index], self.lengths[index], self.dropped_tokens,
                      *(None if c is None else c[index] for c in (self.positions, self.labelled)))


Masks = Optional[List[Optional[np.ndarray]]]  # per document: its labelled tokens (a record), or None (text)


def _record(masks: Masks, i: int) -> Optional[np.ndarray]:
    return None if masks is None else masks[i]


def pack(token_lists: List[np.ndarray], pad_id: int, seq_len: int, max_tokens: Optional[int] = None,
         masks: Masks = None) -> Packed:
    """Rows of the documents in order, up to `max_tokens` real tokens if given; `masks` (records'
    labelled tokens, None per text document) make the rows carry `labelled`."""
    rows, lengths, labelled, dropped, taken = [], [], [], 0, 0
    max_tokens = 10**18 if max_tokens is None else max_tokens
    for i, tokens in enumerate(token_lists):
        tokens, mask = np.asarray(tokens, dtype=np.int32), _record(masks, i)
        if mask is not None and len(tokens) > seq_len:
            raise ValueError(f"a record of {len(tokens)} tokens cannot fill a row of {seq_len}")  # rows.py checks first
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
            if masks is not None:
                labelled.append(np.zeros(seq_len, bool))
                labelled[-1][:len(piece)] = True if mask is None else mask
    if not rows:
        empty = np.zeros((0, seq_len), np.int32)
        return Packed(empty, np.zeros(0, np.int32), dropped, None, None if masks is None else empty.astype(bool))
    return Packed(np.stack(rows), np.asarray(lengths, dtype=np.int32), dropped, None,
                  None if masks is None else np.stack(labelled))


def pack_documents(token_lists: List[np.ndarray], pad_id: int, seq_len: int, masks: Masks = None) -> Packed:
    """Rows filled with the documents in order, each row with its per-document `positions` (and
    `labelled` when there are `masks`)."""
    rows, lengths, positions, labelled, dropped = [], [], [], [], 0
    row_ids: List[np.ndarray] = []
    row_pos: List[np.ndarray] = []
    row_mask: List[np.ndarray] = []
    used = 0

    def close_row():
        nonlocal row_ids, row_pos, row_mask, used
        ids = np.full(seq_len, pad_id, dtype=np.int32)
        ids[:used] = np.concatenate(row_ids)
        pos = np.empty(seq_len, dtype=np.int32)
        pos[:used] = np.concatenate(row_pos)
        pos[used:] = pos[used - 1] + 1 + np.arange(seq_len - used)  # padding continues the last document
        mask = np.zeros(seq_len, bool)
        mask[:used] = np.concatenate(row_mask)
        rows.append(ids), lengths.append(used), positions.append(pos), labelled.append(mask)
        row_ids, row_pos, row_mask, used = [], [], [], 0

    for i, tokens in enumerate(token_lists):
        tokens, mask = np.asarray(tokens, dtype=np.int32), _record(masks, i)
        if mask is not None:
            if len(tokens) > seq_len:
                raise ValueError(f"a record of {len(tokens)} tokens cannot fill a row of {seq_len}")  # rows.py checks first
            if used and len(tokens) > seq_len - used:  # a record is never cut: it starts the next row
                close_row()
        start = 0
        while start < len(tokens):
            if used and seq_len - used < 2:  # no room for a piece that predicts anything
                close_row()
            piece = tokens[start:start + seq_len - used]
            piece_mask = np.ones(len(piece), bool) if mask is None else mask[start:start + len(piece)]
            start += len(piece)
            if len(piece) < 2:
                dropped += len(piece)
                continue
            row_ids.append(piece)
            row_pos.append(np.arange(len(piece), dtype=np.int32))
            row_mask.append(piece_mask)
            used += len(piece)
    if used:
        close_row()
    if not rows:
        empty = np.zeros((0, seq_len), np.int32)
        return Packed(empty, np.zeros(0, np.int32), dropped, empty.copy(), None if masks is None else empty.astype(bool))
    return Packed(np.stack(rows), np.asarray(lengths, dtype=np.int32), dropped, np.stack(positions),
                  None if masks is None else np.stack(labelled))


def concat(parts: List[Packed], seq_len: int) -> Packed:
    """The rows of `parts` in order (every column they have)."""
    parts = [p for p in parts if len(p.rows)]
    if not parts:
        return Packed(np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32), 0)

    def joined(column: str):
        return None if getattr(parts[0], column) is None else np.concatenate([getattr(p, column) for p in parts])
    return Packed(joined("rows"), joined("lengths"), sum(p.dropped_tokens for p in parts), joined("positions"),
                  joined("labelled"))


def document_spans(shape: tuple, positions: Optional[np.ndarray]) -> List[tuple]:
    """(row, start, stop) of every document in rows of `shape` [N, seq_len]; the whole row when
    `positions` is None. The last span of a row includes its padding."""
    count, seq_len = shape
    if positions is None:
        return [(b, 0, seq_len) for b in range(count)]
    check_positions(shape, positions)
    spans = []
    for b in range(count):
        starts = np.flatnonzero(np.asarray(positions[b]) == 0).tolist() + [seq_len]
        spans += [(b, a, z) for a, z in zip(starts[:-1], starts[1:])]
    return spans


def check_positions(shape: tuple, positions: np.ndarray) -> None:
    if tuple(np.shape(positions)) != tuple(shape):
        raise DistillError(f"positions of shape {tuple(np.shape(positions))} do not match token ids of shape "
                           f"{tuple(shape)}")


def segment_ids(positions: torch.Tensor) -> torch.Tensor:
    """[B, T] long: the index of the document each token belongs to within its row."""
    return (positions == 0).long().cumsum(-1) - 1


def full_rows(token_lists: List[np.ndarray], seq_len: int, count: Optional[int] = None) -> np.ndarray:
    """The first `count` (default: all) rows with no padding, for benchmarks that compare like with like."""
    packed = pack(token_lists, 0, seq_len)
    rows = packed.rows[packed.lengths == seq_len][:count]
    if count is not None and len(rows) < count:
        raise ValueError(f"only {len(rows)} full rows of {seq_len} tokens; {count} wanted")
    return rows


def next_token_labels(input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                      positions: Optional[torch.Tensor] = None, labelled: Optional[torch.Tensor] = None) -> torch.Tensor:
    """labels[t] = input_ids[t + 1] where token t + 1 is real, of the same document and (given
    `labelled`) one the loss predicts, such as a response token; the rest is IGNORE_INDEX."""
    import torch

    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if lengths is not None:
        index = torch.arange(input_ids.shape[1], device=input_ids.device)
        labels[index[None, :] >= lengths.to(input_ids.device)[:, None] - 1] = IGNORE_INDEX
    if positions is not None:  # the last token of a document does not predict the next one's first
        labels[:, :-1][positions[:, 1:].to(input_ids.device) == 0] = IGNORE_INDEX
    if labelled is not None:  # only responses are learned: a prompt token is no label
        labels[:, :-1][~labelled[:, 1:].to(input_ids.device).bool()] = IGNORE_INDEX
    return labels


def packed_labels(packed: Packed, device="cpu") -> tuple:
    """(input_ids, labels, positions or None) of `packed`'s rows, as long tensors on `device`."""
    import torch

    def tensor(column):
        return None if column is None else torch.as_tensor(column, device=device)
    ids, positions = tensor(packed.rows).long(), tensor(packed.positions)
    positions = None if positions is None else positions.long()
    return ids, next_token_labels(ids, tensor(packed.lengths), positions, tensor(packed.labelled)), positions


def token_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, seq_len] bool: True on real tokens."""
    import torch

    return torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]


def predicted_bytes(packed: Packed, tokenizer) -> int:
    """UTF-8 bytes of the predicted tokens of every row (positions 1 .. length-1, and only the
    labelled ones where rows carry `labelled`): the denominator of bits per byte, the same for the
    held-out split and for `distill eval`. Special tokens (the EOS ending a document, a chat
    template's markers) are predicted but count no bytes."""
    total = 0
    for i, (row, n) in enumerate(zip(packed.rows, packed.lengths)):
        ids = row[1:n] if packed.labelled is None else row[1:n][packed.labelled[i][1:n]]
        total += len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
    return total
