"""Save and load a BitNet student in transformers format (config.json + safetensors), strictly.

A folder is written in the layout student/layout.py describes, so plain `from_pretrained` builds the
same model or refuses it. A checkpoint that would load partly random is an error, and writes are
atomic: the folder appears complete under its final name or not at all, and an existing checkpoint
is never overwritten. `load_student` also reads folders written before the layout existed (version 1:
the base model type with our `bitnet` block, and the old packed export).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Union

import torch
from safetensors.torch import load_file
from torch import nn

from distillation.errors import DistillError
from distillation.student.bitnet import BITNET_CONFIG_KEY, convert_to_bitnet, is_bitnet_student
from distillation.student.layout import base_config, from_disk_names, renames_for, saved_config, to_disk_names

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def save_student(model: nn.Module, out_dir: Path, tokenizer=None, state_dict: Optional[dict] = None) -> Path:
    """`state_dict`: the weights to write, when `model`'s own are not whole (a sharded student's, from
    training/parallel.py). A full-precision model (student.ternary=false) is written as transformers
    writes it."""
    if not is_bitnet_student(model):
        state = state_dict if state_dict is not None else model.state_dict()
        return write_dense(out_dir, model.config, state, tokenizer, getattr(model, "generation_config", None))
    settings = getattr(model.config, BITNET_CONFIG_KEY)
    state = state_dict if state_dict is not None else model.state_dict()
    return write_student(out_dir, model.config, settings["subln"], "online", state, tokenizer,
                         getattr(model, "generation_config", None))


def write_student(out_dir: Path, config, subln: str, weights: str, state: Dict[str, torch.Tensor], tokenizer=None,
                  generation_config=None, copy_from: Optional[Path] = None) -> Path:
    """Write `state` (in-memory names) under `out_dir` in the transformers layout for `weights`
    (online | packed); `copy_from`: a folder whose tokenizer files come along."""
    saved, layout = saved_config(config, subln, weights)
    return _write(out_dir, saved, to_disk_names(state, layout.renames), getattr(config, "tie_word_embeddings", False),
                  tokenizer, generation_config, copy_from)


def write_dense(out_dir: Path, config, state: Dict[str, torch.Tensor], tokenizer=None, generation_config=None) -> Path:
    """A full-precision model in transformers' own layout (what `from_pretrained` and teacher.model read)."""
    return _write(out_dir, config.to_dict(), state, getattr(config, "tie_word_embeddings", False), tokenizer,
                  generation_config)


def _write(out_dir: Path, saved: dict, state: Dict[str, torch.Tensor], tied: bool, tokenizer=None,
           generation_config=None, copy_from: Optional[Path] = None) -> Path:
    from huggingface_hub import save_torch_state_dict

    from distillation.models import TOKENIZER_FILES

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise DistillError(f"refusing to overwrite existing checkpoint {out_dir}")
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # stored once, as the embedding
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (staging / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        save_torch_state_dict(state, staging)
        if generation_config is not None:
            generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name in TOKENIZER_FILES if copy_from is not None else ():
            assert copy_from is not None  # the loop runs only then
            if (Path(copy_from) / name).is_file():
                shutil.copy2(Path(copy_from) / name, staging / name)
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


def read_student_config(path: Union[str, Path], dense: bool = False) -> dict:
    """A student folder's config.json as a dict; a folder that is not a student (or, if `dense`, a
    full-precision model) is a DistillError."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise DistillError(f"student checkpoint '{path}' does not exist or has no config.json")
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DistillError(f"student checkpoint '{path}' has an unreadable config.json: {exc}") from None
    if not isinstance(saved.get(BITNET_CONFIG_KEY), dict) and not (dense and "model_type" in saved):
        raise DistillError(f"'{path}' is not a BitNet student checkpoint (config.json has no '{BITNET_CONFIG_KEY}')")
    return saved


def load_student(path: Union[str, Path], dtype: Optional[torch.dtype] = None, dense: bool = False) -> nn.Module:
    """Rebuild the student from its config and load every weight; any missing or extra key fails.
    A packed folder comes back with ternary layers that keep 2 bits per weight (student/packed.py).
    `dense`: a full-precision model trained here (student.ternary=false) is welcome too (training
    checkpoints); elsewhere (`distill eval`, export, generate) a folder that is not a student is refused."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    saved = read_student_config(path, dense=dense)
    if BITNET_CONFIG_KEY not in saved:  # a full-precision model trained here (student.ternary=false)
        return _load_dense(path, saved, dtype)
    settings = saved[BITNET_CONFIG_KEY]
    config = base_config(saved)
    state = from_disk_names(_read_state(path), renames_for(saved))
    # Parameters start on the meta device and the loaded tensors are assigned, so no throwaway random
    # weights are allocated (a packed student never holds a dense layer); buffers (rotary tables) are real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
        convert_to_bitnet(model, settings["subln"])
    if settings.get("weights") == "packed":
        from distillation.student.packed import load_packed

        load_packed(model, state, scale_is_reciprocal=settings.get("version", 1) < 2)
    _assign_strictly(model, state, f"student checkpoint '{path}'")
    getattr(model.config, BITNET_CONFIG_KEY)["weights"] = settings.get("weights", "online")
    return model.to(dtype) if dtype is not None else model


def _load_dense(path: Path, saved: dict, dtype: Optional[torch.dtype]) -> nn.Module:
    """A full-precision folder, every weight loaded strictly (from_pretrained would warn and go on)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**saved))
    _assign_strictly(model, _read_state(path), f"model checkpoint '{path}'")
    return model.to(dtype) if dtype is not None else model


def _assign_strictly(model: "PreTrainedModel", state: Dict[str, torch.Tensor], what: str) -> None:
    """`state` assigned to `model`'s (meta) parameters; any missing or extra key is an error naming `what`."""
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys)
    if getattr(model.config, "tie_word_embeddings", False):
        missing.discard("lm_head.weight")  # stored once, as the embedding
    if missing or result.unexpected_keys:
        raise DistillError(f"{what} does not match its config: "
                           f"missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    model.tie_weights()
