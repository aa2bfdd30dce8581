"""The paths only a GPU runs: the teacher on the device, the student's step under bf16 autocast, influence
scoring and held-out evaluation on the device, the vLLM engine on the GPU. Skipped, with the reason,
on a machine without CUDA; `python -m bench gpu` runs them where there is one."""

from functools import partial

import numpy as np
import pytest
import torch

from conftest import tiny_llama_config
from distillation.data.packing import Packed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gpu-teacher")
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(out)
    return out


def _ids(rows=4, length=32):
    return np.random.default_rng(0).integers(0, 128, (rows, length))


@pytest.mark.parametrize("signal", ["hidden", "sampled", "topk"])
def test_the_teacher_on_the_gpu_answers_like_the_cpu_one(teacher_dir, signal):
    from distillation.teachers.hf import HFTeacher

    gpu = HFTeacher(teacher_dir, top_k=8, temperature=2.0, dtype="float32", signal=signal, device="cuda").score(_ids())
    cpu = HFTeacher(teacher_dir, top_k=8, temperature=2.0, dtype="float32", signal=signal).score(_ids())
    if signal == "hidden":
        np.testing.assert_allclose(gpu.hidden.astype(np.float32), cpu.hidden.astype(np.float32), atol=2e-2)
    elif signal == "topk":
        np.testing.assert_allclose(gpu.topk_logprobs.astype(np.float32), cpu.topk_logprobs.astype(np.float32),
                                   atol=1e-2)


def test_a_student_step_under_bf16_autocast_on_the_gpu(teacher_dir):
    from transformers import AutoModelForCausalLM

    from distillation.student import convert_to_bitnet
    from distillation.teachers.hf import HFTeacher
    from distillation.training.plan import loss_weights
    from distillation.training.step import micro_step

    student = convert_to_bitnet(AutoModelForCausalLM.from_pretrained(teacher_dir), "paper").cuda()
    answer = HFTeacher(teacher_dir, top_k=8, temperature=1.0, dtype="bfloat16", signal="sampled", device="cuda")
    ids = _ids()
    batch = {"input_ids": torch.as_tensor(ids).cuda(), "length": torch.full((len(ids),), ids.shape[1]).cuda(),
             **{k: torch.as_tensor(v).cuda() for k, v in answer.score(ids).to_columns().items()}}
    out = micro_step(student, batch, loss_weights(temperature=1.0, attention_weight=0.0), 128,
                     autocast=partial(torch.autocast, "cuda", dtype=torch.bfloat16))
    assert torch.isfinite(out.total) and all(p.grad is not None and p.grad.is_cuda
                                             for p in student.parameters() if p.requires_grad)


def test_influence_and_evaluation_run_on_the_models_device(teacher_dir):
    from transformers import AutoModelForCausalLM

    from distillation.training.evaluate import heldout_loss
    from distillation.training.influence import alignment_scores

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).cuda()
    ids = _ids()
    rows = Packed(ids.astype(np.int32), np.full(len(ids), ids.shape[1], np.int32), 0)
    assert np.isfinite(heldout_loss(model, rows, 1000)["loss"])
    as_gpu = (torch.as_tensor(ids).cuda(), torch.full((len(ids),), ids.shape[1]).cuda())
    scores = alignment_scores(model, as_gpu, {"a": as_gpu})
    assert scores["a"] == pytest.approx(1.0, abs=1e-4)


def test_the_vllm_engine_on_the_gpu_scores_token_ids(teacher_dir):
    # No importorskip: on a GPU machine vLLM's GPU build is part of the check (`bench gpu` installs it).
    from distillation.teachers.vllm import VLLMTeacher

    teacher = VLLMTeacher(teacher_dir, top_k=8, temperature=1.0, dtype="float32", device="cuda",
                          gpu_memory_utilization=0.3)
    try:
        answer = teacher.score(_ids(rows=2))
        assert answer.topk_ids.shape == (2, 32, 8) and np.isfinite(answer.topk_logprobs).all()
    finally:
        teacher.close()
