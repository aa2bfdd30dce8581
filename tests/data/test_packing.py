"""Cutting documents into rows (one per row, or packed end to end with per-document positions), and
the next-token labels and mask."""


import numpy as np
import pytest
import torch

from distillation.data.packing import document_spans, next_token_labels, pack, pack_documents, segment_ids, token_mask
from distillation.losses import IGNORE_INDEX


def test_pack_keeps_one_document_per_row_pads_the_last_piece_and_counts_what_it_drops():
    packed = pack([np.arange(1, 6), np.arange(10, 13), np.array([7])], pad_id=0, seq_len=4, max_tokens=100)
    assert packed.rows.tolist() == [[1, 2, 3, 4], [10, 11, 12, 0]]  # no row mixes two documents
    assert packed.lengths.tolist() == [4, 3]
    assert packed.dropped_tokens == 2  # the one-token piece [5] and the one-token document [7]
    assert len(pack([np.arange(1, 100)], pad_id=0, seq_len=4, max_tokens=10).rows) == 3  # budget: 4 + 4 + 4 >= 10


def test_labels_shift_by_one_and_mask_the_last_real_position_and_the_padding():
    ids = torch.tensor([[5, 6, 7, 0], [1, 2, 3, 4]])
    assert next_token_labels(ids).tolist() == [[6, 7, 0, IGNORE_INDEX], [2, 3, 4, IGNORE_INDEX]]
    labels = next_token_labels(ids, torch.tensor([3, 4]))
    assert labels.tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX], [2, 3, 4, IGNORE_INDEX]]
    assert token_mask(torch.tensor([3, 4]), 4).tolist() == [[True, True, True, False], [True] * 4]


def test_the_fill_ratio_counts_real_tokens_over_every_training_row_position():
    from distillation.data.corpus import fill_ratio

    short = pack([np.arange(2, 5), np.arange(2, 12)], pad_id=0, seq_len=8, max_tokens=100)  # 3 | 8 | 2 real
    full = pack([np.arange(2, 18)], pad_id=0, seq_len=8, max_tokens=100)  # 8 | 8
    empty = pack([], pad_id=0, seq_len=8, max_tokens=100)
    assert fill_ratio([short, full, empty]) == (3 + 8 + 2 + 8 + 8) / (5 * 8)


def test_pack_documents_fills_rows_end_to_end_and_restarts_positions_where_a_document_starts():
    docs = [np.arange(1, 6), np.arange(10, 13), np.arange(20, 30), np.array([40]), np.arange(50, 52)]
    packed = pack_documents(docs, pad_id=0, seq_len=8)
    assert packed.rows.tolist() == [[1, 2, 3, 4, 5, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27],
                                    [28, 29, 50, 51, 0, 0, 0, 0]]  # the 10-token document continues
    assert packed.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7],
                                         [0, 1, 0, 1, 2, 3, 4, 5]]  # padding continues the last document
    assert packed.lengths.tolist() == [8, 8, 4] and packed.dropped_tokens == 1  # the one-token document
    assert document_spans(packed.rows.shape, packed.positions) == [(0, 0, 5), (0, 5, 8), (1, 0, 8), (2, 0, 2),
                                                                   (2, 2, 8)]
    assert document_spans((2, 8), None) == [(0, 0, 8), (1, 0, 8)]
    assert segment_ids(torch.as_tensor(packed.positions))[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    no_room = pack_documents([np.arange(1, 8), np.arange(10, 13)], pad_id=0, seq_len=8)  # one free position
    assert no_room.rows.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0], [10, 11, 12, 0, 0, 0, 0, 0]]
    assert no_room.lengths.tolist() == [7, 3] and no_room.dropped_tokens == 0


def test_packed_labels_never_cross_a_document_boundary():
    packed = pack_documents([np.arange(1, 6), np.arange(10, 13), np.arange(20, 24)], pad_id=0, seq_len=8)
    labels = next_token_labels(torch.as_tensor(packed.rows).long(), torch.as_tensor(packed.lengths),
                               torch.as_tensor(packed.positions))
    assert labels.tolist() == [[2, 3, 4, 5, IGNORE_INDEX, 11, 12, IGNORE_INDEX],
                               [21, 22, 23, IGNORE_INDEX] + [IGNORE_INDEX] * 4]


def test_records_are_never_cut_and_carry_their_labelled_tokens_beside_text_which_is_all_labelled():
    record, mask = np.arange(30, 35), np.array([False, False, True, True, True])  # prompt 30 31, response 32-34
    text = np.arange(1, 5)
    rows = pack([text, record], pad_id=0, seq_len=6, masks=[None, mask])
    assert rows.labelled.tolist() == [[True] * 4 + [False] * 2, [False, False, True, True, True, False]]
    packed = pack_documents([text, record, np.arange(40, 42)], pad_id=0, seq_len=6, masks=[None, mask, None])
    # the record does not fit after the text (2 free positions): it starts the next row, whole
    assert packed.rows.tolist() == [[1, 2, 3, 4, 0, 0], [30, 31, 32, 33, 34, 0], [40, 41, 0, 0, 0, 0]]
    assert packed.labelled[1].tolist() == [False, False, True, True, True, False]
    labels = next_token_labels(torch.as_tensor(packed.rows), torch.as_tensor(packed.lengths),
                               torch.as_tensor(packed.positions), torch.as_tensor(packed.labelled))
    # only the response is predicted (31 -> 32 is the first label); text rows keep every label
    assert labels[1].tolist() == [IGNORE_INDEX, 32, 33, 34, IGNORE_INDEX, IGNORE_INDEX]
    assert labels[0].tolist() == [2, 3, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert pack([text], pad_id=0, seq_len=6).labelled is None  # no records: no column, as before
    with pytest.raises(ValueError, match="a record of 5 tokens cannot fill a row of 4"):
        pack_documents([record], pad_id=0, seq_len=4, masks=[mask])
