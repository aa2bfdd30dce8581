"""Export for inference: every trained `AutoBitLinear` becomes a packed ternary layer.

The packed layer stores the ternary weight as 2 bits per value (transformers' `pack_weights` layout,
4 per uint8) plus one fp32 scale, the same tensors as transformers' `BitLinear`. The SubLN norm,
where present, moves over unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.bitnet import (
    VALUES_PER_ITEM,
    ActQuant,
    AutoBitLinear,
    BitLinear,
    pack_weights,
    unpack_weights,
)

from distillation.student.bitnet import BITNET_CONFIG_KEY, ternary_weights


class PackedBitLinear(BitLinear):
    """transformers' `BitLinear` storage with the training layer's order of operations.

    `BitLinear.forward` multiplies integer activations by integer weights and divides by both scales
    afterwards. That is equal in exact arithmetic, but the last-ulp differences flip some int8
    activation roundings in later layers, and over a 30-layer stack the logits drift (measured:
    KL 1e-2 nats/token). Dequantizing first, exactly as `AutoBitLinear` does, makes the packed model
    reproduce the trained one bit for bit.
    """

    def forward(self, input):
        if self.rms_norm is not None:
            input = self.rms_norm(input)
        weight = unpack_weights(self.weight, dtype=torch.float32) / self.weight_scale.float()
        input = ActQuant.apply(input)
        return F.linear(input, weight.to(input.dtype), self.bias)


def _packed_layer(layer: AutoBitLinear, dtype: torch.dtype) -> BitLinear:
    if layer.out_features % VALUES_PER_ITEM:
        raise ValueError(f"cannot pack a layer with {layer.out_features} outputs: the 2-bit layout needs a "
                         f"multiple of {VALUES_PER_ITEM}")
    packed = PackedBitLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=layer.weight.device, dtype=dtype, use_rms_norm=layer.rms_norm is not None,
                       rms_norm_eps=layer.rms_norm.variance_epsilon if layer.rms_norm is not None else 1e-6)
    return packed


def _swap(model: nn.Module, fill: bool, dtype: torch.dtype) -> nn.Module:
    for name, module in list(model.named_modules()):
        if not isinstance(module, AutoBitLinear):
            continue
        packed = _packed_layer(module, dtype)
        if fill:
            with torch.no_grad():
                packed.weight.copy_(pack_weights(ternary_weights(module).to(torch.int8)))
                # The reciprocal of absmean, computed exactly as WeightQuant does (same fp32 value).
                packed.weight_scale.copy_(1.0 / module.weight.float().abs().mean().clamp(min=1e-5))
                if module.bias is not None:
                    packed.bias.copy_(module.bias.to(dtype))
                if module.rms_norm is not None:
                    packed.rms_norm.weight.copy_(module.rms_norm.weight)
        model.set_submodule(name, packed)
    getattr(model.config, BITNET_CONFIG_KEY)["weights"] = "packed"
    return model


def pack_student(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every AutoBitLinear in place by a packed BitLinear holding the same ternary weights."""
    return _swap(model, fill=True, dtype=dtype)


def packed_skeleton(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The packed layout with empty weights, for loading a packed checkpoint."""
    return _swap(model, fill=False, dtype=dtype)


def linear_weight_bytes(model: nn.Module) -> dict:
    """Bytes of the BitNet layers' weights (with their scales) as stored, and of the same weights in
    fp16. Embeddings and lm_head stay full precision and are not counted."""
    stored = fp16 = 0
    for module in model.modules():
        if isinstance(module, BitLinear):
            stored += module.weight.nbytes + module.weight_scale.nbytes
        elif isinstance(module, AutoBitLinear):
            stored += module.weight.nbytes
        else:
            continue
        fp16 += module.in_features * module.out_features * 2
    return {"stored": stored, "fp16": fp16}
