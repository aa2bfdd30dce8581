"""Where the student's starting weights come from, identical in every worker and in the held-out
scoring task (training/heldout.py)."""

from typing import Optional

from omegaconf import DictConfig
from torch import nn

from distillation.models import ModelSource, load_causal_lm, resolve_model
from distillation.student.bitnet import convert_to_bitnet
from distillation.student.checkpoint import load_student


def set_compile(enabled: bool) -> None:
    """transformers' BitNet quantizers are wrapped in torch.compile; on CPU that cost ~30 s at start
    and gave no speed-up (measured, README), so eager is the default."""
    import torch

    torch.compiler.set_stance("default" if enabled else "force_eager")


def build_student(cfg: DictConfig, init_from: Optional[ModelSource] = None) -> nn.Module:
    """A saved student (`student.checkpoint_path`), else stage 1: `init_from` (the driver's pinned
    `student.init_from`; resolved here from the config when None) converted to BitNet."""
    if cfg.student.checkpoint_path:
        return load_student(cfg.student.checkpoint_path)
    source = init_from if init_from is not None else resolve_model(cfg.student.init_from, cfg.data.cache_dir)
    model = load_causal_lm(source, "float32", cfg.teacher.trust_remote_code)
    return convert_to_bitnet(model, cfg.student.subln, cfg.student.num_layers)
