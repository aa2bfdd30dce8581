"""Where the student's starting weights come from, identical in every worker and in the held-out
scoring task (roles/heldout_task.py)."""

from torch import nn

from distillation.models import load_causal_lm
from distillation.specs import StudentSpec
from distillation.student.bitnet import convert_to_bitnet, truncate_layers
from distillation.student.checkpoint import load_student


def set_compile(enabled: bool) -> None:
    """transformers' BitNet quantizers are wrapped in torch.compile; on CPU that cost ~30 s at start
    and gave no speed-up (measured, README), so eager is the default."""
    import torch

    torch.compiler.set_stance("default" if enabled else "force_eager")


def build_student(spec: StudentSpec) -> nn.Module:
    """A saved student, else stage 1: `init_from` converted to BitNet (or, not `ternary`, as it is:
    stage 0 fine-tunes the teacher in full precision; `num_layers` truncates either)."""
    if spec.checkpoint_path:
        return load_student(spec.checkpoint_path, dense=not spec.ternary)
    if spec.init_from is None:
        raise ValueError("a StudentSpec without checkpoint_path needs init_from")
    model = load_causal_lm(spec.init_from, "float32", spec.trust_remote_code)
    if spec.ternary:
        return convert_to_bitnet(model, spec.subln, spec.num_layers)
    if spec.num_layers is not None:
        truncate_layers(model, spec.num_layers)
    return model
