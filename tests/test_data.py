"""Packing, labels, the mixture (plan and actor), splits, the real text sources and file formats."""

import json

import numpy as np
import pytest
import ray
import torch

from distillation.data.mixture import Mixture, MixturePlan, validate_weights
from distillation.data.packing import next_token_labels, pack, token_mask
from distillation.data.pipeline import rank_sample_ids, read_batches, step_blocks, worker_stream
from distillation.data.sources import load_documents, split_of
from distillation.errors import DistillError
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


def _plan(**kw):
    args = dict(names=["a", "b"], sizes=[50, 200], weights=[0.25, 0.75], seed=3, samples_per_step=10)
    return MixturePlan(**{**args, **kw})


def test_plan_is_seeded_follows_weights_and_visits_without_replacement():
    draws = _plan().draw(4000)
    assert draws == _plan().draw(4000)
    assert abs(np.mean([s for s, _ in draws]) - 0.75) < 0.03
    first_epoch = [i for s, i in draws if s == 0][:50]
    assert sorted(first_epoch) == list(range(50))


def test_plan_resumes_from_its_state_exactly_including_weight_updates():
    whole = _plan(update_steps=[5], delay=2)
    whole.set_weights(5, [0.9, 0.1])
    expected = whole.draw(300)
    first = _plan(update_steps=[5], delay=2)
    part = first.draw(40)
    resumed = MixturePlan.from_state(json.loads(json.dumps(first.state())))  # through JSON, as in a checkpoint
    resumed.set_weights(5, [0.9, 0.1])
    assert part + resumed.draw(300) == expected


def test_plan_refuses_to_draw_past_a_missing_update_and_ignores_a_repeated_one():
    plan = _plan(update_steps=[5], delay=2)
    plan.draw(70)  # steps 0..6: step 7 is the first that needs the update of step 5
    with pytest.raises(DistillError, match="update of step 5"):
        plan.draw(71)
    assert plan.set_weights(5, [1, 0]) and not plan.set_weights(5, [0, 1])
    assert {s for s, _ in plan.draw(200)[-100:]} == {0}
    with pytest.raises(DistillError, match="no weight update is scheduled"):
        plan.set_weights(6, [1, 0])


def test_weights_are_relative_but_must_be_non_negative_and_not_all_zero():
    assert validate_weights([1, 3], ["a", "b"]).tolist() == [0.25, 0.75]
    for bad in ([0, 0], [1, -1], [1, float("nan")], [1]):
        with pytest.raises(DistillError, match="non-negative, not all zero and one per source"):
            validate_weights(bad, ["a", "b"])


def test_mixture_actor_proportions_follow_an_update_from_the_next_step_on(ray_cluster):
    """The running pipeline reads weights from the actor: measure what it draws before and after."""
    plan = MixturePlan(["a", "b"], [100, 100], [0.5, 0.5], seed=0, samples_per_step=100, update_steps=[10], delay=1)
    rows = {n: np.arange(100 * 4, dtype=np.int32).reshape(100, 4) for n in "ab"}
    lengths = {n: np.full(100, 4, dtype=np.int32) for n in "ab"}
    mixture = Mixture.remote(plan.state(), rows, lengths)
    before = ray.get(mixture.draw.remote(np.arange(0, 1000)))["source"]
    pending = mixture.draw.remote(np.arange(1100, 1200))  # step 11 needs the update of step 10
    assert not ray.wait([pending], timeout=1.0)[0]  # ... so it waits for it
    ray.get(mixture.set_weights.remote(10, [0.1, 0.9]))
    ray.get(pending)
    after = ray.get(mixture.draw.remote(np.arange(1100, 3000)))["source"]
    assert abs(before.mean() - 0.5) < 0.05 and abs(after.mean() - 0.9) < 0.03
    batch = ray.get(mixture.draw.remote(np.array([5, 6])))
    assert batch["input_ids"].shape == (2, 4) and batch["length"].tolist() == [4, 4]
    replay = MixturePlan.from_state(ray.get(mixture.state_at.remote(1500)))
    assert replay.count == 1500 and replay.weights_at(20).tolist() == [0.1, 0.9]


def test_teacher_requests_never_span_two_steps():
    blocks = step_blocks(np.arange(10, 20), rows_per_step=4, request_size=3)
    assert [b.tolist() for b in blocks] == [[10, 11, 12], [13], [14, 15, 16], [17], [18, 19]]


@pytest.mark.slow
@pytest.mark.timeout(300)  # passes in under a minute here; a deadlock fails here, not at the 20-minute limit
def test_the_stream_never_waits_on_its_own_rows_when_every_step_moves_the_weights(ray_cluster):
    """The tightest schedule: the consumer sends the update of step s only after reading step s, and
    step s + 1 draws with it (delay 1). Hundreds of one-row steps (a long run in miniature), several
    requests in flight, run out of order by Ray Data: a request holding rows of three steps, or one
    call slot for all requests, waits forever here."""
    steps = 450  # over 200 rows: what from_items would merge into blocks of three
    plan = MixturePlan(["a", "b"], [60, 60], [0.5, 0.5], seed=0, samples_per_step=1,
                       update_steps=range(1, steps - 1), delay=1)
    rows = {n: np.arange(60 * 4, dtype=np.int32).reshape(60, 4) for n in "ab"}
    mixture = Mixture.options(name="stream-mixture").remote(plan.state(), rows,
                                                            {n: np.full(60, 4, np.int32) for n in "ab"})
    try:
        stream = worker_stream(np.arange(steps), 1, "stream-mixture", None, "no-teacher", request_size=1,
                               max_in_flight=4, max_attempts=1)
        seen = []
        for step, batch in enumerate(read_batches(stream, batch_size=1), start=1):  # as the trainer reads
            seen.extend(batch["sample_id"].tolist())
            if step in plan.update_steps:
                ray.get(mixture.set_weights.remote(step, [0.9, 0.1] if step % 2 else [0.1, 0.9]))
        assert seen == list(range(steps))
        assert len(ray.get(mixture.history.remote())) == steps - 1  # every update arrived and was used
    finally:
        ray.kill(mixture)


def test_rank_sample_ids_partition_the_run_and_start_at_the_resumed_step():
    parts = [rank_sample_ids(r, 2, batch_size=3, grad_accum=2, start_step=0, max_steps=4) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(4 * 2 * 2 * 3))
    assert parts[0][:6].tolist() == [0, 1, 2, 6, 7, 8]  # micro-batch 0 of rank 0, then its micro-batch 1
    resumed = rank_sample_ids(1, 2, batch_size=3, grad_accum=2, start_step=2, max_steps=4)
    assert resumed.tolist() == parts[1][len(parts[1]) // 2:].tolist()


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


def test_jsonl_parquet_and_saved_datasets_read_the_same_documents(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

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


@pytest.mark.parametrize("kind,content,message", [
    ("jsonl", '{"text": "ok"}\n{broken\n', "a.jsonl:2: not valid JSON"),
    ("jsonl", '{"body": "no text field"}\n', "expected a string field 'text'"),
    ("jsonl", "", "has no non-empty documents"),
    ("parquet", None, "cannot read column 'text'"),
    ("hf_disk", None, "load_from_disk"),
])
def test_bad_source_files_are_clear_errors(tmp_path, kind, content, message):
    if kind == "jsonl":
        (tmp_path / "a.jsonl").write_text(content)
    elif kind == "parquet":
        (tmp_path / "a.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DistillError, match=message):
        load_documents("mine", kind, str(tmp_path), "unused", max_tokens=100)


def test_a_folder_without_files_of_the_kind_is_a_clear_error(tmp_path):
    with pytest.raises(DistillError, match="holds no .jsonl/.json files"):
        load_documents("mine", "jsonl", str(tmp_path), "unused", max_tokens=100)
