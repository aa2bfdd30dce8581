"""Locating and loading causal LMs (safetensors only, no remote code by default), and Q/K/V capture."""

import contextlib
from pathlib import Path
from typing import Dict, Iterator

import torch
from torch import nn

from distillation.assets import BUILTIN_MODELS, builtin_model_dir
from distillation.errors import DistillError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(name_or_path: str, cache_dir: str) -> Path:
    """A built-in model name or a local directory holding config.json + *.safetensors."""
    if name_or_path in BUILTIN_MODELS:
        return builtin_model_dir(name_or_path, cache_dir)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise DistillError(f"model path '{name_or_path}' does not exist; expected a directory with config.json "
                           f"and *.safetensors, or one of: {', '.join(BUILTIN_MODELS)}")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise DistillError(f"model path '{name_or_path}' has no config.json or no *.safetensors weights")
    return path


def load_causal_lm(path: Path, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


@contextlib.contextmanager
def capture_qkv(model: nn.Module, layer: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the outputs of `layer`'s q/k/v projections (before RoPE) with forward hooks.

    Hooks rather than `output_attentions`, so the fast attention kernels stay in use and only one
    layer's states are kept.
    """
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise DistillError(f"attention layer {layer} is out of range for a model with {len(layers)} layers")
    attn = layers[layer].self_attn
    states: Dict[str, torch.Tensor] = {}
    handles = []
    for key in ("q", "k", "v"):
        def hook(_module, _inputs, output, key=key):
            states[key] = output
        handles.append(getattr(attn, f"{key}_proj").register_forward_hook(hook))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()
