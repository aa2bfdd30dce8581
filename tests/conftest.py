"""Shared fixtures: tiny real transformers models (random init, safetensors on disk)."""

import pytest
import torch


def tiny_llama_config(vocab_size=128, layers=2, hidden=64, heads=4, kv_heads=2, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=512, tie_word_embeddings=True, **extra)


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
