"""The two built-in tasks: real text, held out by whole work or module, read as a prompt/response source."""

import json
from collections import Counter

from distillation.data.sources import open_source, read_unit
from distillation.tasks.builtin import GENRE_TEST_WORKS, GENRES, task_file


def _records(task, split, cache_dir):
    return [json.loads(line) for line in open(task_file(task, split, cache_dir))]


def test_genre_passages_are_held_out_by_whole_work_with_both_editions_on_one_side_and_every_genre_on_both(cache_dir):
    train, test = _records("shakespeare_genre", "train", cache_dir), _records("shakespeare_genre", "test", cache_dir)
    assert {r["work"] for r in train}.isdisjoint({r["work"] for r in test})
    assert {r["work"] for r in test} == GENRE_TEST_WORKS
    for split in (train, test):
        assert set(Counter(r["response"] for r in split)) == set(GENRES)
    folio = {r["file"] for r in test if r["file"].endswith("_f")}
    assert "macbeth_gut_f" in folio and "macbeth_gut" in {r["file"] for r in test}  # both editions held out
    assert all(len(r["prompt"].splitlines()) == 8 for r in train + test)
    assert not any("Tragedie of" in r["prompt"] or "Persons Represented" in r["prompt"] for r in train + test)


def test_docstring_records_are_held_out_by_top_level_module(cache_dir):
    train, test = _records("stdlib_docstring", "train", cache_dir), _records("stdlib_docstring", "test", cache_dir)
    top = lambda r: r["module"].split("/")[0].removesuffix(".py")  # noqa: E731
    assert {top(r) for r in train}.isdisjoint({top(r) for r in test}) and len(test) > 200
    for r in train[:200]:
        assert r["prompt"].startswith(("def ", "async def ")) and r["response"] not in r["prompt"]
        assert r["response"].endswith((".", "!", "?")) and 4 <= len(r["response"].split()) <= 30


def test_a_task_kind_is_a_prompt_response_source_of_its_split(cache_dir):
    spec = open_source("genre", "shakespeare_genre", None, cache_dir, split="test")
    docs = [d for u in spec.units for d in read_unit(spec, u)]
    assert len(docs) == len(_records("shakespeare_genre", "test", cache_dir))
    assert {d.turns[1][1] for d in docs} == set(GENRES) and docs[0].turns[0][0] == "prompt"


def test_every_built_in_record_fits_its_tasks_rows_under_smollm2s_chat_template(cache_dir, smollm2_dir):
    """Both tasks run at data.seq_len=256 (the miniature teacher's context too): a record that did not
    fit would stop a run as a bad record."""
    from distillation.config import load_config
    from distillation.data.records import prompt_turns, render
    from distillation.models import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    for task in ("shakespeare_genre", "stdlib_docstring"):
        cfg = load_config([f"task={task}"])
        template = cfg.data.sources[0].prompt_template
        records = [r for split in ("train", "test") for r in _records(task, split, cache_dir)]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": template.format(prompt=r["prompt"])},
                                                {"role": "assistant", "content": r["response"]}], tokenize=False)
                 for r in records]  # the whole conversation, as render tokenizes it (in one batch here)
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        longest = records[max(range(len(records)), key=lengths.__getitem__)]
        assert max(lengths) == len(render(tokenizer, prompt_turns(longest["prompt"], longest["response"], template),
                                          True)[0])
        assert max(lengths) <= cfg.data.seq_len == 256, (task, max(lengths))
