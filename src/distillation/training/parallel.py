"""How the student is spread over the training workers (`training.parallelism`):

    ddp   every worker holds the whole student and its AdamW moments; gradients are all-reduced
          (Ray Train's `prepare_model`)
    fsdp  every worker holds 1/world of each parameter, of its gradient and of its moments (torch
          FSDP2 `fully_shard`, on each decoder layer and then the whole model): a layer is gathered
          for its forward and backward, and its gradients are reduce-scattered

FSDP2 rather than Ray Train's `prepare_model(parallel_strategy="fsdp")`, which wraps FSDP1: FSDP1
flattens parameters into one FlatParameter per unit, so the optimizer state no longer lines up with
the model's parameters, and torch now develops FSDP2 in its place. FSDP2 keeps every parameter
under its own name (a DTensor shard).

Checkpoints are the same either way: the whole student and an optimizer state keyed by parameter
index (training/checkpoint.py). Under FSDP building them is collective (every rank takes part, rank 0
receives the whole), so a run saved under one parallelism resumes under the other.
"""

from contextlib import nullcontext
from typing import Optional

import ray.train.torch
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

WHOLE_ON_RANK_0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # other ranks receive {}


def distribute(student: nn.Module, parallelism: str, device: torch.device) -> nn.Module:
    """The student on this worker's device, DDP-wrapped or sharded in place (FSDP)."""
    if parallelism == "ddp":
        return ray.train.torch.prepare_model(student)
    student.to(device)
    # A decoder layer is the unit gathered at once: transformers names its class in _no_split_modules.
    layer_classes = set(getattr(student, "_no_split_modules", None) or ())
    for module in student.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(student)
    return student


def unwrapped(model: nn.Module) -> nn.Module:
    """The student itself: DDP's `.module`; a sharded student is its own module."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, sync: bool):
    """A context for one micro-step's backward: reduce gradients across workers only when `sync` (the
    last micro-batch of an optimizer step); the others accumulate locally."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


def whole_student_state(core: nn.Module) -> Optional[dict]:
    """Collective under FSDP: the whole student's state dict on rank 0 ({} on the others). None when
    the student is not sharded (its own `state_dict()` is whole)."""
    return get_model_state_dict(core, options=WHOLE_ON_RANK_0) if is_sharded(core) else None


def optimizer_state(core: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state in torch's own format (parameters by index), whole. Collective under FSDP,
    where only rank 0 receives it ({} on the others)."""
    if not is_sharded(core):
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(core, optimizer, options=WHOLE_ON_RANK_0)
    if not by_name:
        return {}
    index = {name: i for i, (name, _) in enumerate(core.named_parameters())}  # the optimizer's order
    return {"state": {index[name]: entry for name, entry in by_name["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def load_optimizer_state(core: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole, index-keyed optimizer state (every rank passes it); FSDP keeps each rank's shard."""
    if not is_sharded(core):
        optimizer.load_state_dict(state)
        return
    names = [name for name, _ in core.named_parameters()]
    by_name = {"state": {names[i]: entry for i, entry in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(core, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
