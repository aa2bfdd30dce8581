"""The transformers teacher's signals: per-row sampled draws, and hidden states that the student side
turns back into the teacher's exact logits with a frozen copy of its output head."""

import numpy as np
import pytest
import torch

from conftest import save_tiny_llama
from distillation.losses import HiddenTargets, logits_kl
from distillation.models import load_output_head
from distillation.teachers.cache_store import TeacherCache, teacher_signature
from distillation.teachers.cached_teacher import CachedTeacher
from distillation.teachers.hf import HFTeacher


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("teachers") / "tied", seed=3, vocab_size=200)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("teachers") / "untied", seed=3, vocab_size=200,
                           tie_word_embeddings=False)


def _ids(seed, rows=5, length=12):
    return np.random.default_rng(seed).integers(0, 200, (rows, length))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_rows_draws_do_not_depend_on_what_shares_its_forward_pass(tied, dtype):
    ids = _ids(0)
    batched = HFTeacher(tied, top_k=8, temperature=5.0, dtype=dtype, signal="sampled", draws=12).score(ids)
    one_row_per_pass = HFTeacher(tied, top_k=8, temperature=5.0, dtype=dtype, signal="sampled", draws=12,
                                 max_tokens_per_batch=ids.shape[1]).score(ids)
    teacher = HFTeacher(tied, top_k=8, temperature=5.0, dtype=dtype, signal="sampled", draws=12)
    reordered = teacher.score(ids[::-1])
    for i in range(len(ids)):
        alone = teacher.score(ids[i:i + 1])
        for answer, row in ((batched, i), (one_row_per_pass, i), (reordered, len(ids) - 1 - i)):
            np.testing.assert_array_equal(answer.sampled_ids[row], alone.sampled_ids[0])
            np.testing.assert_array_equal(answer.sampled_weights[row], alone.sampled_weights[0])
    assert not np.array_equal(batched.sampled_ids[0], batched.sampled_ids[1])  # rows differ: seeds differ


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_hidden_signal_through_the_loaded_head_gives_the_teachers_own_logits(tied, untied, which):
    from transformers import AutoModelForCausalLM

    model_dir = {"tied": tied, "untied": untied}[which]
    ids = _ids(1, rows=3)
    answer = HFTeacher(model_dir, top_k=8, temperature=5.0, dtype="float32", signal="hidden").score(ids)
    assert answer.signal == "hidden" and answer.hidden.shape == (3, 12, 64) and answer.temperature is None
    assert answer.nbytes_per_token() == 64 * 2  # hidden_size fp16 values per position, nothing else
    head = load_output_head(model_dir, vocab_size=200)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids)).logits
    rebuilt = HiddenTargets(torch.as_tensor(answer.hidden), head).raw_logits()
    assert (rebuilt - logits).abs().max() < 5e-3  # fp16 rounding of the hidden states only
    labels = torch.as_tensor(ids).roll(-1, 1)
    exact = logits_kl(torch.zeros_like(logits), _dense(logits), labels, 5.0)
    via_hidden = logits_kl(torch.zeros_like(logits), HiddenTargets(torch.as_tensor(answer.hidden), head), labels, 5.0)
    assert abs(exact.item() - via_hidden.item()) < 1e-4 * max(1.0, exact.item())


def _dense(logits):
    from distillation.losses import DenseTargets

    return DenseTargets(logits)


def test_hidden_states_are_cached_once_for_every_temperature_and_replay_exactly(tied, tmp_path):
    teacher = HFTeacher(tied, top_k=8, temperature=5.0, dtype="float32", signal="hidden")
    settings = {"signal": "hidden", "top_k": None, "draws": None, "temperature": None, "qkv_layer": None,
                "vocab_size": 200}
    signature = teacher_signature(tied, settings)
    ids = _ids(2)
    live = CachedTeacher(TeacherCache(str(tmp_path), signature, create=True), teacher)
    first = live.score(ids)
    live.flush()
    replay = CachedTeacher(TeacherCache(str(tmp_path), signature, create=False)).score(ids)
    np.testing.assert_array_equal(replay.hidden, first.hidden)
    assert replay.temperature is None and replay.signal == "hidden"


def test_a_teacher_that_answers_nan_is_a_one_line_error_naming_the_model(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    from distillation.errors import DistillError

    model = AutoModelForCausalLM.from_pretrained(tied)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    broken = tmp_path / "nan-teacher"
    model.save_pretrained(broken)
    teacher = HFTeacher(broken, top_k=8, temperature=5.0, dtype="float32", signal="topk")
    with pytest.raises(DistillError, match=f"teacher {broken} gave unusable answers: .*NaN") as caught:
        teacher.score(_ids(3))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("signal", ["topk", "hidden"])
def test_a_packed_row_is_answered_as_its_documents_would_be_alone(tied, signal):
    from distillation.data.packing import document_spans, pack_documents

    docs = [np.random.default_rng(seed).integers(0, 200, n) for seed, n in ((1, 7), (2, 4), (3, 9))]
    packed = pack_documents(docs, pad_id=0, seq_len=12)  # [7 | 4 + 1 padding] [9 + 3 padding]
    teacher = HFTeacher(tied, top_k=8, temperature=2.0, dtype="float32", signal=signal, qkv_layer=1)
    together = teacher.score(packed.rows, packed.positions)
    spans = document_spans(packed.rows.shape, packed.positions)
    assert len(spans) == 3
    for (b, a, z), doc in zip(spans, docs):
        alone = teacher.score(doc[None])
        n = len(doc)
        for field in ("topk_logprobs", "hidden", "q", "k", "v"):
            if getattr(alone, field) is not None:
                np.testing.assert_allclose(getattr(together, field)[b, a:a + n].astype(np.float32),
                                           getattr(alone, field)[0].astype(np.float32), atol=2e-3, err_msg=field)
    unpacked = teacher.score(packed.rows)  # the same rows read as one document each differ
    for field in ("q", "topk_logprobs" if signal == "topk" else "hidden"):
        assert not np.allclose(getattr(unpacked, field)[0, 7:11].astype(np.float32),
                               getattr(together, field)[0, 7:11].astype(np.float32), atol=1e-2)
