"""The teacher cache: signatures, atomic shards, replay, and write-through with a real teacher."""

import json

import numpy as np
import pytest
import torch

from distillation.errors import DistillError
from distillation.teachers.cache_store import TeacherCache, sequence_key, teacher_signature
from distillation.teachers.cached_teacher import CachedTeacher
from distillation.teachers.hf import HFTeacher

SETTINGS = {"top_k": 8, "temperature": 5.0, "qkv_layer": -1, "vocab_size": 128, "signal": "topk+tail"}


@pytest.fixture
def live(tiny_dir):
    return HFTeacher(tiny_dir, top_k=8, temperature=5.0, qkv_layer=-1, dtype="float32")


def _ids(seed, rows=3, length=10):
    return np.random.default_rng(seed).integers(0, 128, (rows, length))


def test_signature_changes_with_every_signal_setting(tiny_dir):
    base = teacher_signature(tiny_dir, SETTINGS)["signature"]
    assert teacher_signature(tiny_dir, dict(SETTINGS))["signature"] == base
    for key, value in [("top_k", 16), ("temperature", 1.0), ("qkv_layer", None), ("vocab_size", 100)]:
        assert teacher_signature(tiny_dir, {**SETTINGS, key: value})["signature"] != base


def test_write_through_stores_answers_that_replay_exactly(tiny_dir, live, tmp_path):
    signature = teacher_signature(tiny_dir, SETTINGS)
    teacher = CachedTeacher(TeacherCache(str(tmp_path), signature, create=True, flush_rows=4), live)
    ids = _ids(0)
    first = teacher.score(ids)
    assert (teacher.hits, teacher.misses) == (0, 3)
    again = teacher.score(ids)
    assert (teacher.hits, teacher.misses) == (3, 3)
    direct = live.score(ids)
    for name, value in direct.to_columns().items():
        np.testing.assert_array_equal(first.to_columns()[name], value)
        np.testing.assert_array_equal(again.to_columns()[name], value)
    # 3 rows pending (< flush_rows): nothing on disk yet; flush writes one complete shard, no temp file
    directory = tmp_path / signature["signature"]
    assert not list(directory.glob("*.parquet"))
    teacher.flush()
    assert len(list(directory.glob("*.parquet"))) == 1 and not list(directory.glob(".*"))
    assert json.loads((directory / "signature.json").read_text())["top_k"] == 8

    replay = CachedTeacher(TeacherCache(str(tmp_path), signature, create=False))
    mixed = np.concatenate([ids[2:], ids[:2]])  # order of rows does not matter, only their content
    out = replay.score(mixed)
    np.testing.assert_array_equal(out.topk_ids, np.concatenate([direct.topk_ids[2:], direct.topk_ids[:2]]))
    assert out.q.shape == direct.q.shape and float(out.temperature[0]) == 5.0


def test_replay_only_cache_refuses_misses_and_missing_folders(tiny_dir, live, tmp_path):
    signature = teacher_signature(tiny_dir, SETTINGS)
    with pytest.raises(DistillError, match="no teacher cache for this teacher"):
        TeacherCache(str(tmp_path), signature, create=False)
    cache = TeacherCache(str(tmp_path), signature, create=True)
    cache.add(_ids(1), live.score(_ids(1)))
    cache.flush()
    replay = CachedTeacher(TeacherCache(str(tmp_path), signature, create=False))
    with pytest.raises(DistillError, match="2 of 3 sequences are not in the teacher cache"):
        replay.score(np.concatenate([_ids(1)[:1], _ids(2)[:2]]))


def test_sequence_key_depends_on_content_only():
    ids = _ids(3)
    assert sequence_key(ids[0]) == sequence_key(ids[0].astype(np.int64).copy())
    assert sequence_key(ids[0]) != sequence_key(ids[1])


def test_sampled_signal_is_seeded_by_content_and_replays_from_the_cache(tiny_dir, tmp_path):
    teacher = HFTeacher(tiny_dir, top_k=8, temperature=5.0, dtype="float32", signal="sampled", draws=6)
    ids = _ids(4)
    first, again = teacher.score(ids), teacher.score(ids)
    np.testing.assert_array_equal(first.sampled_ids, again.sampled_ids)  # same tokens, same draws
    assert first.topk_ids is None and first.sampled_ids.shape == (3, 10, 6)
    np.testing.assert_allclose(first.sampled_weights.astype(np.float32).sum(-1), 1.0, atol=1e-3)
    assert not np.array_equal(teacher.score(_ids(5)).sampled_ids, first.sampled_ids)

    signature = teacher_signature(tiny_dir, {**SETTINGS, "signal": "sampled", "draws": 6, "top_k": None})
    cached = CachedTeacher(TeacherCache(str(tmp_path), signature, create=True), teacher)
    cached.score(ids)
    cached.flush()
    replay = CachedTeacher(TeacherCache(str(tmp_path), signature, create=False)).score(ids)
    for name, value in first.to_columns().items():
        np.testing.assert_array_equal(replay.to_columns()[name], value)


def test_position_t_holds_the_distribution_of_token_t_plus_1(tiny_dir, live):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = _ids(6, rows=1, length=8)
    answer = live.score(ids)
    for t in range(ids.shape[1]):
        with torch.no_grad():  # the model sees tokens 0..t only and predicts token t + 1
            prefix_logits = model(input_ids=torch.as_tensor(ids[:, : t + 1])).logits[0, -1]
        expected = torch.log_softmax(prefix_logits / 5.0, -1).topk(8)
        np.testing.assert_array_equal(answer.topk_ids[0, t], expected.indices.numpy())
        np.testing.assert_allclose(answer.topk_logprobs[0, t].astype(np.float32), expected.values.numpy(), atol=2e-3)


def test_signature_covers_every_byte_of_the_weights_and_remembers_digests_by_size_and_mtime(tmp_path):
    import os

    from conftest import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model", vocab_size=8192)  # embeddings alone are 2 MiB
    weights = model / "model.safetensors"
    assert weights.stat().st_size > 2 << 20
    memo = tmp_path / "memo"
    before = teacher_signature(model, SETTINGS, memo_dir=str(memo))["signature"]
    remembered = json.loads((memo / "file-sha256.json").read_text())
    assert list(remembered) == [str(weights.resolve())]

    # a fine-tune that differs only in the last weight byte (same size, same first MiB): another teacher
    with open(weights, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    changed = teacher_signature(model, SETTINGS, memo_dir=str(memo))["signature"]
    assert changed != before
    assert teacher_signature(model, SETTINGS)["signature"] == changed  # the memo never changes the answer

    # the memo is what is read while size and mtime are unchanged: a forged entry shows it is used
    stamp = json.loads((memo / "file-sha256.json").read_text())[str(weights.resolve())]
    forged = {str(weights.resolve()): {**stamp, "sha256": "0" * 64}}
    (memo / "file-sha256.json").write_text(json.dumps(forged))
    assert teacher_signature(model, SETTINGS, memo_dir=str(memo))["signature"] != changed
    os.utime(weights, ns=(stamp["stamp"][1] + 10**9, stamp["stamp"][1] + 10**9))  # touched: hashed again
    assert teacher_signature(model, SETTINGS, memo_dir=str(memo))["signature"] == changed


def _hidden_answer(rows, seed, length=64, width=512):
    from distillation.teachers.schema import TeacherOutput

    hidden = np.random.default_rng(seed).standard_normal((rows, length, width)).astype(np.float16)
    return TeacherOutput(hidden=hidden)


def test_replicas_page_row_groups_within_their_memory_setting_and_replay_every_row(tmp_path):
    signature = {"signature": "paging", "temperature": None, "vocab_size": 128}
    writer = TeacherCache(str(tmp_path), signature, create=True, flush_rows=32)
    ids = [_ids(100 + i, rows=32, length=64) for i in range(3)]
    answers = [_hidden_answer(32, i) for i in range(3)]
    for block, answer in zip(ids, answers):
        writer.add(block, answer)  # 32 rows of 64 KiB: one shard each
    shards = sorted((tmp_path / "paging").glob("*.parquet"))
    assert len(shards) == 3 and writer.pending == []
    import pyarrow.parquet as pq

    assert pq.ParquetFile(shards[0]).num_row_groups == 3  # 15 rows of 64 KiB (and a key) per 1 MiB group

    reader = TeacherCache(str(tmp_path), signature, create=False, memory_mb=3)
    assert len(reader.groups) == 0 and len(reader) == 96  # indexing reads key columns only
    one, missing = reader.lookup(ids[1][5:6])
    assert not missing and len(reader.groups) == 1  # one row asked for: one row group read
    np.testing.assert_array_equal(one.hidden, answers[1].hidden[5:6])
    rng = np.random.default_rng(0)
    for _ in range(20):  # random batches across every shard: exact rows, memory within the setting
        shard, rows = int(rng.integers(3)), rng.choice(32, 4, replace=False)
        got, missing = reader.lookup(ids[shard][rows])
        assert not missing
        np.testing.assert_array_equal(got.hidden, answers[shard].hidden[rows])
        assert reader.memory_bytes <= 3 << 20
    assert len(reader.groups) < 9  # 3 MiB of the 6 MiB cache: never all of it

    # a key whose 8-byte prefix points at a row group without it is a miss, never another row's answer
    other = _ids(999, rows=1, length=64)
    from distillation.teachers.cache_store import _prefix

    reader.index.add([_prefix(sequence_key(other[0]))], reader.index.find(_prefix(sequence_key(ids[0][0]))))
    assert reader.lookup(other)[1] == [0]


def test_a_replica_sees_shards_other_replicas_wrote_after_it_opened_the_cache(tmp_path):
    signature = {"signature": "shared", "temperature": None, "vocab_size": 128}
    first = TeacherCache(str(tmp_path), signature, create=True, flush_rows=4)
    second = TeacherCache(str(tmp_path), signature, create=True, flush_rows=4)
    block, answer = _ids(7, rows=4, length=16), _hidden_answer(4, 7, length=16, width=8)
    assert second.lookup(block)[1] == [0, 1, 2, 3]
    first.add(block, answer)  # flushed: 4 rows
    assert second.lookup(block)[1] == [0, 1, 2, 3]  # not re-listed on every lookup ...
    second.reload()  # ... but on reload, which reads only the new shard
    got, missing = second.lookup(block)
    assert not missing and len(second.shards) == 1
    np.testing.assert_array_equal(got.hidden, answer.hidden)

    # a cached teacher reloads on a miss before it answers live or refuses: a replay-only replica
    # finds what a write-through replica stored after it opened the cache
    replay = CachedTeacher(TeacherCache(str(tmp_path), signature, create=False))
    more, more_answer = _ids(8, rows=4, length=16), _hidden_answer(4, 8, length=16, width=8)
    replay.score(block)
    first.add(more, more_answer)
    np.testing.assert_array_equal(replay.score(more).hidden, more_answer.hidden)
