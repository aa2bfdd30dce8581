"""Packed students: 2 bits per ternary weight on disk and in memory.

On disk a packed student is transformers' offline BitNet layout (student/layout.py): `weight` uint8
[out/4, in] in `pack_weights`' order (4 values per byte along the output dimension, value + 1) and
`weight_scale` [1] = the scale the training layer multiplies its ternary values by, so plain
`from_pretrained` loads it too (as dense ternary matrices). `load_student` instead builds
`TernaryLinear` layers that keep the codes at 2 bits per weight and multiply with the CPU kernel
(student/ternary_kernel.py).

transformers' offline AutoBitLinear multiplies its bias by `weight_scale` as well, so a bias is
stored divided by it; `TernaryLinear` adds the bias as the training layer does.
"""

from typing import Dict, Optional

import torch
from torch import nn
from transformers.integrations.bitnet import VALUES_PER_ITEM, AutoBitLinear, pack_weights

from distillation.errors import DistillError
from distillation.student.bitnet import ternary_weights
from distillation.student.ternary_kernel import pack_codes, padded, ternary_linear


class TernaryLinear(nn.Module):
    """An inference-only BitNet layer: optional input RMSNorm, per-token int8 activations, ternary
    weights kept packed (kernel layout), one fp32 scale. Its tensors are buffers outside the state
    dict: a packed folder is read by `load_packed`, never written from this layer."""

    codes: torch.Tensor  # buffers, registered in __init__
    bias: Optional[torch.Tensor]

    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, weight_scale: float,
                 bias=None, rms_norm=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", codes, persistent=False)
        self.weight_scale = float(weight_scale)
        self.register_buffer("bias", bias, persistent=False)
        self.rms_norm = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        return ternary_linear(x, self.codes, self.in_features, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=2"


def training_scale(layer: AutoBitLinear) -> torch.Tensor:
    """The value the training layer multiplies a ternary +-1 by: 1 / (1 / mean|W|), in fp32, computed
    exactly as WeightQuant divides by its scale."""
    inverse = 1.0 / layer.weight.detach().float().abs().mean().clamp(min=1e-5)
    return (1.0 / inverse).reshape(1)


def packed_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict of a packed folder (in-memory names) from an online student."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if not isinstance(module, AutoBitLinear):
            continue
        if module.out_features % VALUES_PER_ITEM:
            raise DistillError(f"cannot pack {name}: {module.out_features} outputs, the 2-bit layout needs a "
                               f"multiple of {VALUES_PER_ITEM}")
        scale = training_scale(module)
        state[f"{name}.weight"] = pack_weights(ternary_weights(module).to(torch.int8))
        state[f"{name}.weight_scale"] = scale
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().float() / scale
    return state


def unpack_transformers(packed: torch.Tensor) -> torch.Tensor:
    """transformers' `unpack_weights` as int8, without its torch.compile wrapper (a C++ build on CPU)."""
    return torch.cat([(packed >> (2 * i)) & 3 for i in range(VALUES_PER_ITEM)]).to(torch.int8) - 1


def load_packed(model: nn.Module, state: Dict[str, torch.Tensor], scale_is_reciprocal: bool = False) -> None:
    """Swap each AutoBitLinear of a freshly converted `model` for a TernaryLinear built from `state`
    (popping the tensors it takes). `scale_is_reciprocal`: a version-1 folder, whose `weight_scale`
    held 1 / mean|W| (transformers' BitLinear) and whose bias was stored as it is."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, AutoBitLinear):
            continue
        try:
            packed, scale = state.pop(f"{name}.weight"), state.pop(f"{name}.weight_scale")
        except KeyError:
            raise DistillError(f"packed student has no packed weight or scale for {name}") from None
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (module.out_features // VALUES_PER_ITEM,
                                                                   module.in_features):
            raise DistillError(f"packed weight {name} is {packed.dtype} {tuple(packed.shape)}, expected uint8 "
                               f"({module.out_features // VALUES_PER_ITEM}, {module.in_features})")
        scale = 1.0 / scale.float() if scale_is_reciprocal else scale.float()
        bias = state.pop(f"{name}.bias", None)
        if bias is not None:
            bias = bias.float() * (1.0 if scale_is_reciprocal else scale)
        codes = pack_codes(unpack_transformers(packed))
        assert codes.shape[1] * 4 == padded(module.in_features)
        model.set_submodule(name, TernaryLinear(module.in_features, module.out_features, codes, scale.item(), bias,
                                                module.rms_norm))


def linear_weight_bytes(model: nn.Module) -> dict:
    """Bytes of the BitNet layers' weights (with their scales) as held in memory, and of the same
    weights in bf16. Embeddings and lm_head stay full precision and are not counted."""
    stored = bf16 = 0
    for module in model.modules():
        if isinstance(module, TernaryLinear):
            stored += module.codes.nbytes + 4
        elif isinstance(module, AutoBitLinear):
            stored += module.weight.nbytes
        else:
            continue
        bf16 += module.in_features * module.out_features * 2
    return {"stored": stored, "bf16": bf16}

