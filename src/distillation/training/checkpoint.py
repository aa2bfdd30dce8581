"""A training checkpoint: everything a resumed run needs to continue exactly where it stopped.

    student/            the student in transformers format (safetensors, strict reload)
    optimizer.safetensors  AdamW moments and step counts, one tensor per parameter and key
    torch_rng.safetensors  the CPU (and CUDA) generator states
    train_state.json    step, tokens, NaN-skip count, optimizer hyper-parameters, scheduler state,
                        and the data plan's state (mixture RNG, cursors, weight history)
    config.yaml         the resolved run configuration

Tensors are stored only as safetensors (no pickle is ever loaded). The folder is staged in a temp
directory and handed to `ray.train.report`, which persists it before the checkpoint is registered,
so a crash mid-write never replaces the last good checkpoint.
"""

import json
import tempfile
from pathlib import Path
from typing import List, Optional

import torch
from safetensors.torch import load_file, save_file

from distillation.errors import DistillError
from distillation.storage import join, read_text, remove_folder, subfolders
from distillation.student import load_student, save_student

STATE_FILE = "train_state.json"


def _optimizer_tensors(state: dict) -> tuple:
    tensors = {f"{index}.{key}": value.contiguous() for index, entry in state["state"].items()
               for key, value in entry.items() if torch.is_tensor(value)}
    scalars = {f"{index}.{key}": value for index, entry in state["state"].items()
               for key, value in entry.items() if not torch.is_tensor(value)}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_training_checkpoint(model, optimizer_state: dict, scheduler, config_yaml: str, state: dict,
                             model_state: Optional[dict] = None) -> Path:
    """Write the checkpoint folder (staging, for ray.train.report) and return it. `optimizer_state` is
    in torch's format (parameters by index, as `optimizer.state_dict()`); `model_state` the whole
    student's weights when `model` holds only a shard (training/parallel.py)."""
    folder = Path(tempfile.mkdtemp(prefix="distill-ckpt-"))
    save_student(model, folder / "student", state_dict=model_state)
    tensors, meta = _optimizer_tensors(optimizer_state)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(folder / "torch_rng.safetensors"))
    full = {**state, "optimizer": meta, "scheduler": scheduler.state_dict()}
    (folder / STATE_FILE).write_text(json.dumps(full))
    (folder / "config.yaml").write_text(config_yaml)
    return folder


def remove_unregistered(location: str) -> List[str]:
    """Remove checkpoint folders under Ray Train's `location` that its snapshot does not list: what a
    worker went on writing after its driver was killed (Ray Train never registers, keeps or deletes
    those). Returns their names."""
    snapshot = read_text(join(location, "checkpoint_manager_snapshot.json"))
    if snapshot is None:
        return []
    registered = {r["checkpoint_dir_name"] for r in json.loads(snapshot).get("checkpoint_results", [])}
    orphans = [name for name in subfolders(location) if name.startswith("checkpoint_") and name not in registered]
    for name in orphans:
        remove_folder(join(location, name))
    return orphans


def read_state(folder: Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not Path(folder).exists():  # not a damaged checkpoint: the place that held it went away
        raise DistillError(f"checkpoint {folder} is gone: its storage location was deleted or unmounted while the "
                           f"run used it (run.storage_path, or the run folder's ray/train)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DistillError(f"checkpoint {folder} is incomplete or corrupt: cannot read {STATE_FILE} ({exc})") from None


def load_training_checkpoint(folder: Path) -> tuple:
    """(student model, train state, optimizer tensors) from `folder`, and the torch RNG restored.

    The model is rebuilt rather than loaded into an existing one so that `load_student`'s strict key
    check applies; the optimizer built on it is then restored from `saved_optimizer_state(state, tensors)`."""
    folder = Path(folder)
    state = read_state(folder)
    model = load_student(folder / "student", dense=True)
    try:
        tensors = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "torch_rng.safetensors"))
    except Exception as exc:  # safetensors raises its own types for truncated or missing files
        raise DistillError(f"checkpoint {folder} is incomplete or corrupt: {exc}") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return model, state, tensors


def saved_optimizer_state(state: dict, tensors: dict) -> dict:
    """The saved optimizer state back in torch's format (parameters by index)."""
    entries: dict = {}
    for name, value in list(tensors.items()) + list(state["optimizer"]["scalars"].items()):
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = value
    return {"state": entries, "param_groups": state["optimizer"]["param_groups"]}
