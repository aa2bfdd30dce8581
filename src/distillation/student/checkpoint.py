"""Save and load a BitNet student in transformers format (config.json + safetensors), strictly.

A checkpoint that would load partly random is an error, and writes are atomic: the folder appears
complete under its final name or not at all, and an existing checkpoint is never overwritten.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from distillation.errors import DistillError
from distillation.student.bitnet import BITNET_CONFIG_KEY, convert_to_bitnet


def save_student(model: nn.Module, out_dir: Path, tokenizer=None, state_dict: Optional[dict] = None) -> Path:
    """`state_dict`: the weights to write, when `model`'s own are not whole (a sharded student's, from
    training/parallel.py); transformers empties the dict as it writes."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise DistillError(f"refusing to overwrite existing checkpoint {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _read_state(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        if not (path / name).is_file():
            raise DistillError(f"student checkpoint {path} is missing {name}")
        try:
            state.update(load_file(path / name))
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise DistillError(f"student checkpoint file {path / name} is unreadable: {exc}") from None
    return state


def load_student(path: Path, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Rebuild the student from its config and load every weight; any missing or extra key fails."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise DistillError(f"student checkpoint '{path}' does not exist or has no config.json")
    config = AutoConfig.from_pretrained(path)
    settings = getattr(config, BITNET_CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise DistillError(f"'{path}' is not a BitNet student checkpoint (config.json has no '{BITNET_CONFIG_KEY}')")
    model = AutoModelForCausalLM.from_config(config)
    convert_to_bitnet(model, settings["subln"])
    if settings.get("weights") == "packed":
        from distillation.student.packed import packed_skeleton

        packed_skeleton(model)
    state = _read_state(path)
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys)
    if getattr(config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")  # stored once, as the embedding
    if missing or result.unexpected_keys:
        raise DistillError(f"student checkpoint '{path}' does not match its config: "
                           f"missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    model.tie_weights()
    return model.to(dtype) if dtype is not None else model
