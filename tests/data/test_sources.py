"""Splits, the real text sources and the file formats (text, jsonl, parquet, saved datasets)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillation.data import sources
from distillation.data.sources import load_documents, open_source, read_unit, split_of
from distillation.errors import DistillError


def test_split_choice_is_stable_and_near_the_fractions():
    ids = [f"src/doc{i}" for i in range(5000)]
    chosen = [split_of(i, 0.1, 0.05) for i in ids]
    assert chosen == [split_of(i, 0.1, 0.05) for i in ids]
    assert 0.08 < np.mean([c == "heldout" for c in chosen]) < 0.12
    assert 0.035 < np.mean([c == "probe" for c in chosen]) < 0.065


@pytest.mark.parametrize("kind", ["shakespeare", "python_stdlib", "python_docs"])
def test_real_sources_yield_real_text(kind, tmp_path):
    from distillation.config import load_config

    docs = load_documents(kind, kind, None, load_config().data.cache_dir, max_tokens=20_000)
    assert docs and all(d.text.strip() for d in docs)
    text = " ".join(d.text for d in docs)
    marker = {"shakespeare": "thou", "python_stdlib": "def ", "python_docs": "the"}[kind]
    assert marker in text
    whole = open_source(kind, kind, None, load_config().data.cache_dir)
    capped = open_source(kind, kind, None, load_config().data.cache_dir, max_tokens=20_000)
    assert 1 <= len(capped.units) <= len(whole.units) and capped.units == whole.units[:len(capped.units)]
    assert sum(u.size for u in capped.units[:-1]) < 4 * 20_000  # whole units up to about 4 bytes per token


def test_text_source_reads_files_and_rejects_a_missing_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01")
    docs = load_documents("mine", "text", str(tmp_path), "unused", max_tokens=100)
    assert [d.text for d in docs] == ["hello world"]
    with pytest.raises(DistillError, match="does not exist"):
        load_documents("mine", "text", str(tmp_path / "nope"), "unused", max_tokens=100)


def test_long_files_are_cut_into_pieces_at_line_ends_that_rejoin_exactly():
    from distillation.data.sources import PIECE_CHARS, Document, _pieces

    text = "".join(f"line {i} " * (i % 7 + 1) + "\n" for i in range(5000)) + "x" * (PIECE_CHARS + 5)
    pieces = list(_pieces("src", "play", text))
    assert "".join(p.text for p in pieces) == text
    assert all(len(p.text) <= PIECE_CHARS for p in pieces)
    assert all(p.text.endswith("\n") for p in pieces[:-3])
    assert len({p.doc_id for p in pieces}) == len(pieces)
    assert [p.ends for p in pieces] == [False] * (len(pieces) - 1) + [True]  # EOS follows the last piece only
    assert list(_pieces("src", "short", "one line\n")) == [Document("src", "short", "one line\n")]


def test_jsonl_parquet_and_saved_datasets_read_the_same_documents(tmp_path):
    import datasets

    texts = ["first document", "second one", "third, with a comma"]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(texts)))
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"body": texts}), tmp_path / "p" / "a.parquet")
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "d"))
    for kind, path in (("jsonl", "j"), ("parquet", "p"), ("hf_disk", "d")):
        docs = load_documents("mine", kind, str(tmp_path / path), "unused", max_tokens=1000, text_field="body")
        assert sorted(d.text for d in docs) == sorted(texts), kind
        assert len({d.doc_id for d in docs}) == 3


CHATS = [[{"role": "user", "content": "Is it good?"}, {"role": "assistant", "content": "positive"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And this?"},
          {"role": "assistant", "content": "negative"}]]
PAIRS = {"question": ["2 + 2?", "Capital of France?"], "answer": ["4", "Paris"]}


def test_chat_and_prompt_response_records_read_alike_from_jsonl_parquet_and_saved_datasets(tmp_path):
    import datasets

    from distillation.data.sources import Fields

    chat = Fields("messages", messages="conversation")
    pairs = Fields("prompt_response", prompt="question", response="answer", prompt_template="Q: {prompt}\nA: ")
    want = {"chat": sorted(tuple((m["role"], m["content"]) for m in c) for c in CHATS),
            "pairs": sorted((("prompt", f"Q: {q}\nA: "), ("response", a)) for q, a in zip(*PAIRS.values()))}
    columns = {"chat": {"conversation": CHATS}, "pairs": PAIRS}
    for name, fields in (("chat", chat), ("pairs", pairs)):
        records = [dict(zip(columns[name], values)) for values in zip(*columns[name].values())]
        (tmp_path / name / "j").mkdir(parents=True)
        (tmp_path / name / "j" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        (tmp_path / name / "p").mkdir()
        pq.write_table(pa.Table.from_pylist(records), tmp_path / name / "p" / "a.parquet")
        datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / name / "d"))
        for kind, path in (("jsonl", "j"), ("parquet", "p"), ("hf_disk", "d")):
            spec = open_source(name, kind, str(tmp_path / name / path), "unused", fields=fields)
            docs = [d for u in spec.units for d in read_unit(spec, u)]
            assert sorted(d.turns for d in docs) == want[name] and all(d.text == "" for d in docs), (name, kind)
    with pytest.raises(DistillError, match="format 'messages' needs records"):
        open_source("x", "python_docs", None, "unused", fields=chat)


@pytest.mark.parametrize("record, fields, message", [
    ({"prompt": "hi"}, ("prompt_response",), "a.jsonl:1: no field 'response' \\(data.sources\\[\\].response_field\\)"),
    ({"prompt": "hi", "response": " "}, ("prompt_response",), "a.jsonl:1: the response \\('response'\\) is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, ("messages",), "a.jsonl:1: the conversation has no assistant turn"),
    ({"messages": "hi"}, ("messages",), "a.jsonl:1: messages must be a non-empty list"),
    ({"prompt": "hi", "response": "maybe"}, ("prompt_response",), "a.jsonl:1: the answer 'maybe' is not one of task.labels"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "so-so"}]}, ("messages",),
     "a.jsonl:1: the answer 'so-so' is not one of task.labels \\['yes', 'no'\\]"),
])
def test_a_record_nothing_can_be_learned_from_is_refused_with_its_file_and_line(tmp_path, record, fields, message):
    from distillation.data.sources import Fields

    (tmp_path / "a.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(DistillError, match=message):
        open_source("mine", "jsonl", str(tmp_path), "unused", fields=Fields(*fields, labels=("yes", "no")))


@pytest.mark.parametrize("kind,content,message", [
    ("jsonl", '{"text": "ok"}\n{broken\n', "a.jsonl:2: not valid JSON"),
    ("jsonl", '{"body": "no text field"}\n', "a.jsonl:1: no field 'text' \\(data.sources\\[\\].text_field\\); found \\['body'\\]"),
    ("jsonl", '{"text": 3}\n', "a.jsonl:1: field 'text' is int, expected text"),
    ("jsonl", "", "a.jsonl' holds no records"),
    ("jsonl", "\n\n", "a.jsonl' holds no records"),
    ("parquet", "empty", "a.parquet' holds no rows"),
    ("parquet", None, "cannot read parquet file"),
    ("parquet", "no column", "cannot read column 'text' .*it has columns \\['body'\\]"),
    ("hf_disk", None, "load_from_disk"),
])
def test_bad_source_files_are_clear_errors(tmp_path, kind, content, message):
    if kind == "jsonl":
        (tmp_path / "a.jsonl").write_text(content)
    elif kind == "parquet" and content == "empty":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "a.parquet")
    elif kind == "parquet" and content == "no column":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    elif kind == "parquet":
        (tmp_path / "a.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DistillError, match=message):
        load_documents("mine", kind, str(tmp_path), "unused", max_tokens=100)


def test_a_folder_without_files_of_the_kind_is_a_clear_error(tmp_path):
    with pytest.raises(DistillError, match="holds no .jsonl/.json files"):
        load_documents("mine", "jsonl", str(tmp_path), "unused", max_tokens=100)


def test_a_big_file_is_read_in_line_aligned_byte_ranges_that_together_hold_every_line_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "UNIT_BYTES", 1000)
    lines = [json.dumps({"text": f"document {i} " + "word " * (i % 37)}) for i in range(400)]
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    spec = open_source("big", "jsonl", str(tmp_path), "unused")
    assert len(spec.units) > 10
    by_start = sorted(spec.units, key=lambda u: u.start)
    texts = [d.text for u in by_start for d in read_unit(spec, u)]
    assert texts == [json.loads(line)["text"] for line in lines]
    assert len({d.doc_id for u in spec.units for d in read_unit(spec, u)}) == 400


def test_a_bad_line_past_the_first_unit_names_the_file_its_line_and_byte_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "UNIT_BYTES", 100)
    good = json.dumps({"text": "fine text here"})
    (tmp_path / "a.jsonl").write_text("\n".join([good] * 20 + ["{broken"] + [good] * 5) + "\n")
    spec = open_source("mine", "jsonl", str(tmp_path), "unused")  # the first record is fine: it opens
    offset = 20 * (len(good) + 1)
    with pytest.raises(DistillError, match=f"a.jsonl:21 \\(byte {offset}\\): not valid JSON"):
        for unit in spec.units:
            read_unit(spec, unit)


def test_the_fingerprint_changes_with_a_file_and_only_then(tmp_path):
    import os

    (tmp_path / "a.txt").write_text("some text\n")
    first = open_source("mine", "text", str(tmp_path), "unused").fingerprint
    assert open_source("mine", "text", str(tmp_path), "unused").fingerprint == first
    os.utime(tmp_path / "a.txt", ns=(1, 1))
    assert open_source("mine", "text", str(tmp_path), "unused").fingerprint != first


def test_the_files_that_changed_are_named_from_the_stamps_kept_at_the_start(tmp_path):
    from distillation.data.sources import changed_files, unit_stamps

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"text {name}\n" * 20)
    before = unit_stamps(open_source("mine", "text", str(tmp_path), "unused"))
    assert changed_files(before, open_source("mine", "text", str(tmp_path), "unused")) == []
    (tmp_path / "b.txt").write_text("other text\n" * 20)
    (tmp_path / "d.txt").write_text("new file\n")
    (tmp_path / "c.txt").unlink()
    now = open_source("mine", "text", str(tmp_path), "unused")
    assert changed_files(before, now) == [str(tmp_path / f"{n}.txt") for n in "bcd"]
    assert changed_files(before, now, most=1) == [str(tmp_path / "b.txt"), "2 more"]
