"""Packing, labels, the weighted draw, held-out selection and the real text sources."""

import numpy as np
import pytest
import torch

from distillation.data.mixture import draw_plan, validate_weights
from distillation.data.packing import next_token_labels, pack
from distillation.data.sources import is_heldout, load_documents
from distillation.errors import DistillError
from distillation.losses import IGNORE_INDEX


def test_pack_joins_documents_with_eos_and_counts_the_dropped_rest():
    rows, dropped = pack([np.arange(1, 6), np.arange(10, 13)], eos_id=0, seq_len=4, max_tokens=100)
    assert rows.tolist() == [[1, 2, 3, 4], [5, 0, 10, 11]]
    assert dropped == 2  # 12 and the final EOS
    rows, _ = pack([np.arange(1, 100)], eos_id=0, seq_len=4, max_tokens=10)
    assert rows.shape == (2, 4)


def test_next_token_labels_shift_by_one_and_mask_the_last_position():
    ids = torch.tensor([[5, 6, 7]])
    assert next_token_labels(ids).tolist() == [[6, 7, IGNORE_INDEX]]


def test_draw_plan_is_seeded_follows_weights_and_visits_without_replacement():
    plan = draw_plan([50, 200], [0.25, 0.75], 4000, seed=3)
    assert plan == draw_plan([50, 200], [0.25, 0.75], 4000, seed=3)
    share = np.mean([s for s, _ in plan])
    assert abs(share - 0.75) < 0.03
    first_epoch = [i for s, i in plan if s == 0][:50]
    assert sorted(first_epoch) == list(range(50))


def test_weights_must_be_non_negative_and_not_all_zero():
    assert validate_weights([1, 3], ["a", "b"]).tolist() == [0.25, 0.75]
    with pytest.raises(DistillError, match="not all zero"):
        validate_weights([0, 0], ["a", "b"])
    with pytest.raises(DistillError, match="non-negative"):
        validate_weights([1, -1], ["a", "b"])


def test_heldout_choice_is_stable_and_near_the_fraction():
    ids = [f"src/doc{i}" for i in range(5000)]
    chosen = [is_heldout(i, 0.1) for i in ids]
    assert chosen == [is_heldout(i, 0.1) for i in ids]
    assert 0.08 < np.mean(chosen) < 0.12


@pytest.mark.parametrize("kind", ["shakespeare", "python_stdlib", "python_docs"])
def test_real_sources_yield_real_text(kind, tmp_path):
    from distillation.config import load_config

    docs = load_documents(kind, kind, None, load_config().data.cache_dir, max_tokens=20_000)
    assert docs and all(d.text.strip() for d in docs)
    text = " ".join(d.text for d in docs)
    marker = {"shakespeare": "thou", "python_stdlib": "def ", "python_docs": "the"}[kind]
    assert marker in text
    assert len(text) <= 8 * 20_000 + max(len(d.text) for d in docs)


def test_text_source_reads_files_and_rejects_a_missing_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01")
    docs = load_documents("mine", "text", str(tmp_path), "unused", max_tokens=100)
    assert [d.text for d in docs] == ["hello world"]
    with pytest.raises(DistillError, match="does not exist"):
        load_documents("mine", "text", str(tmp_path / "nope"), "unused", max_tokens=100)


def test_long_files_are_cut_into_pieces_at_line_ends_that_rejoin_exactly():
    from distillation.data.sources import PIECE_CHARS, _pieces

    text = "".join(f"line {i} " * (i % 7 + 1) + "\n" for i in range(5000)) + "x" * (PIECE_CHARS + 5)
    pieces = list(_pieces("play", text))
    assert "".join(p for _, p in pieces) == text
    assert all(len(p) <= PIECE_CHARS for _, p in pieces)
    assert all(p.endswith("\n") for _, p in pieces[:-3])
    assert len({i for i, _ in pieces}) == len(pieces)
    assert list(_pieces("short", "one line\n")) == [("short", "one line\n")]
