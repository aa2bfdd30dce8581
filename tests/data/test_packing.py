"""Packing documents into rows of one document each, and the next-token labels and mask."""


import numpy as np
import torch

from distillation.data.packing import next_token_labels, pack, token_mask
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
