"""A unit cut into rows by the recipe every unit reader uses: EOS ending each document, records with
their responses labelled, packed or one per row; SmolLM2's real tokenizer and chat template."""

import json

import numpy as np
import pytest

from distillation.data.rows import RowRecipe
from distillation.data.sources import Fields, open_source
from distillation.errors import DistillError

PAIRS = [{"q": f"Is review {i} good?", "a": "positive" if i % 2 else "negative"} for i in range(40)]


def _cut(recipe: RowRecipe, spec) -> dict:
    parts = [recipe.cut(spec, unit) for unit in spec.units]
    return {name: [p[name] for p in parts] for name in parts[0]}


def test_every_text_document_ends_with_eos_and_is_all_labels(smollm2_dir, tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"document number {i}."}) for i in range(30)))
    spec = open_source("text", "jsonl", str(tmp_path), "unused")
    for records in (False, True):  # a run with a record source somewhere labels every text token
        rows = _cut(RowRecipe(str(smollm2_dir), 16, 0.0, 0.0, records=records), spec)["train"][0]
        last = rows.rows[np.arange(len(rows.rows)), rows.lengths - 1]
        assert len(rows.rows) == 30 and (last == 2).all()  # <|im_end|>, SmolLM2's EOS
        if records:
            assert (rows.labelled == (np.arange(16)[None, :] < rows.lengths[:, None])).all()
        else:
            assert rows.labelled is None


@pytest.mark.parametrize("pack", [False, True])
def test_prompt_response_rows_label_only_the_response_and_its_eos(smollm2_dir, tmp_path, pack):
    from distillation.models import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(p) for p in PAIRS))
    spec = open_source("pairs", "jsonl", str(tmp_path), "unused",
                       fields=Fields("prompt_response", prompt="q", response="a"))
    cut = _cut(RowRecipe(str(smollm2_dir), 128, 0.2, 0.0, pack_documents=pack, records=True), spec)
    learned, per_row = [], []
    for rows in (cut["train"][0], cut["heldout"][0]):
        for row, n, labelled in zip(rows.rows, rows.lengths, rows.labelled):
            answers = tokenizer.decode(row[:n][labelled[:n]]).split("<|im_end|>")
            assert answers[-1] == ""  # the labelled tokens end with EOS
            learned += answers[:-1]
            per_row.append(len(answers) - 1)
            prompts = tokenizer.decode(row[:n][~labelled[:n]])
            assert prompts.count("<|im_start|>user\nIs review ") == len(answers) - 1  # never labelled
    assert sorted(learned) == sorted(p["a"] for p in PAIRS)  # every record once, train or held out
    assert max(per_row) > 1 if pack else set(per_row) == {1}  # packed rows hold several records, whole


def test_a_record_longer_than_a_row_is_refused_naming_the_source_and_record(smollm2_dir, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "word " * 200, "response": "yes"}) + "\n")
    spec = open_source("long", "jsonl", str(tmp_path), "unused", fields=Fields("prompt_response"))
    with pytest.raises(DistillError, match=r"source 'long', record a.jsonl@0: \d+ tokens once rendered, more than a "
                                           r"row holds \(data.seq_len=64\)"):
        _cut(RowRecipe(str(smollm2_dir), 64, 0.0, 0.0, records=True), spec)
