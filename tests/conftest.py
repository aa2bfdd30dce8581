"""Shared fixtures: tiny real transformers models (random init, safetensors on disk)."""

import socket
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    """A loopback port nothing listens on now (a fixed one may belong to another cluster here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama_config(vocab_size=128, layers=2, hidden=64, heads=4, kv_heads=2, **extra):
    from transformers import LlamaConfig

    extra = {"tie_word_embeddings": True, **extra}
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=512, **extra)


@pytest.fixture
def tiny_llama():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config())


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2 model folder (registry download + dense copy, cached across runs)."""
    from distillation.config import load_config
    from distillation.models import resolve_model

    return resolve_model("smollm2-135m-instruct", load_config().data.cache_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster (2 CPUs, like the CI machine) shared by the slow tests."""
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    serve.shutdown()
    ray.shutdown()


def tiny_model_dir(root: Path, vocab_size: int, seed: int, smollm2: Path, **config) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=vocab_size, **config))
    out = root / f"tiny-{vocab_size}-{seed}"
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, smollm2_dir):
    return tiny_model_dir(tmp_path_factory.mktemp("models"), 49152, seed=1, smollm2=smollm2_dir)


def tiny_overrides(model_dir: Path, out: Path, steps: int = 4):
    return [f"teacher.model={model_dir}", "student.num_layers=null", f"run.output_dir={out}", "run.name=e2e",
            "run.progress=false", "data.seq_len=64", "data.max_tokens_per_source=20000", "data.heldout_sequences=2",
            "data.heldout_fraction=0.2", f"training.max_steps={steps}", "training.batch_size=2", "training.grad_accum=2",
            "training.warmup_steps=1", "distillation.split_heads=4", "distillation.teacher_layer=-1",
            "distillation.student_layer=-1", "teacher.top_k=16", "training.num_threads=1"]
