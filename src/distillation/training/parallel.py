"""How the student is spread over the training workers (`training.parallelism`):

    ddp   every worker holds the whole student and its AdamW moments; gradients are all-reduced
          (Ray Train's `prepare_model`)
    fsdp  every worker holds 1/world of each parameter, of its gradient and of its moments (torch
          FSDP2 `fully_shard`, on each decoder layer and then the whole model): a layer is gathered
          for its forward and backward, and its gradients are reduce-scattered after every
          micro-batch (FSDP2 would otherwise hold whole unsharded gradients between them)

FSDP2 rather than Ray Train's `prepare_model(parallel_strategy="fsdp")`, which wraps FSDP1: FSDP1
flattens parameters into one FlatParameter per unit, so the optimizer state no longer lines up with
the model's parameters, and torch now develops FSDP2 in its place. FSDP2 keeps every parameter
under its own name (a DTensor shard).

Checkpoints are the same either way: the whole student and an optimizer state keyed by parameter
index (training/checkpoint.py). Under FSDP building them is collective (every rank takes part, rank 0
receives the whole), so a run saved under one parallelism resumes under the other.
"""

from contextlib import nullcontext
from typing import Any, Dict, Optional, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    OptimizerStateType,
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from distillation.errors import DistillError
from distillation.models import decoder_layers

WHOLE_ON_RANK_0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # other ranks receive {}


def distribute(student: nn.Module, parallelism: str, device: torch.device) -> nn.Module:
    """The student on this worker's device, DDP-wrapped or sharded in place (FSDP)."""
    if parallelism == "ddp":
        import ray.train.torch  # here, so the step (training/step.py) imports this module without Ray

        return ray.train.torch.prepare_model(student)
    if device.type == "cuda":  # as prepare_model does: NCCL's device, and where fully_shard moves each shard
        torch.cuda.set_device(device)
    check_same_weights(student, device, "before sharding")  # DDP broadcasts rank 0's weights; fully_shard does not
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(student):  # the unit gathered at once
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    return student


def unwrapped(model: nn.Module) -> nn.Module:
    """The student itself: DDP's `.module`; a sharded student is its own module."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, sync: bool):
    """A context for one micro-step's backward. DDP reduces gradients only when `sync` (the last
    micro-batch of an optimizer step; the others accumulate locally). FSDP reduce-scatters every
    micro-batch into the sharded gradients: skipping would keep whole gradients on every rank."""
    return (nullcontext() if sync or not hasattr(model, "no_sync")
            else model.no_sync())  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module


def check_same_weights(model: nn.Module, device: torch.device, when: str) -> None:
    """Every rank must hold the same whole model: a float64 checksum of its parameters, gathered from
    every rank, must agree. (Not for a sharded model: each rank holds a different shard.)"""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        mine = torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1).to(device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    values = [float(v) for v in everyone]
    if max(values) - min(values) > 1e-9 * max(1.0, abs(values[0])):
        raise DistillError(f"training workers hold different students {when} (parameter checksums {values})")


def whole_student_state(core: nn.Module) -> Optional[dict]:
    """Collective under FSDP: the whole student's state dict on rank 0 ({} on the others). None when
    the student is not sharded (its own `state_dict()` is whole)."""
    return get_model_state_dict(core, options=WHOLE_ON_RANK_0) if is_sharded(core) else None


def optimizer_state(core: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state in torch's own format (parameters by index), whole. Collective under FSDP,
    where only rank 0 receives it ({} on the others)."""
    if not is_sharded(core):
        return optimizer.state_dict()
    # {"state": {name: {...}}, "param_groups": [{...}]}; torch types each value as either of the two
    by_name = cast(Dict[str, Any], get_optimizer_state_dict(core, optimizer, options=WHOLE_ON_RANK_0))
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
    by_name: OptimizerStateType = {"state": {names[i]: entry for i, entry in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(core, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
