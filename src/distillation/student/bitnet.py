"""Stage 1 of BitDistill (modeling refinement) on transformers' own BitNet layer.

Every nn.Linear except `lm_head` becomes a transformers `AutoBitLinear` in online mode: absmean
ternary weights and per-token absmax int8 activations with a straight-through estimator, on fp32
master weights. SubLN is that layer's optional input RMSNorm, switched on per placement:
  paper   -> only before `o_proj` and `down_proj` (the BitDistill paper)
  allnorm -> before every BitLinear (the official code's variant)
  none    -> no extra norm
Keeping the original module names means the full-precision weights map 1:1 onto the student, and
the settings travel in `config.json` under `bitnet`, so a checkpoint rebuilds itself exactly.

Gradual ternarisation (`student.quant_warmup_steps`): during the warm-up each layer mixes its
weights and activations as x + mix * (quant(x) - x) (Hugging Face, "Fine-tuning LLMs to 1.58bit",
2024), mix rising from 0 (the full-precision layer) to 1 (transformers' layer, unchanged).
"""

from typing import TYPE_CHECKING, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.bitnet import ActQuant, AutoBitLinear, WeightQuant

from distillation.config.schema import StudentConfig, choices

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

BITNET_CONFIG_KEY = "bitnet"
SUBLN_MODULES = ("o_proj", "down_proj")
NOT_CONVERTED = ("lm_head",)


class RampedBitLinear(AutoBitLinear):
    """transformers' online AutoBitLinear with the warm-up's mix: at `mix` = 1 (the default, and
    always once the warm-up is over) exactly its forward; below 1 the quantisation is blended in.
    Subclassed, not re-implemented: the weights, SubLN and state dict stay transformers' own."""

    mix = 1.0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.mix >= 1.0:
            return super().forward(input)
        if self.rms_norm is not None:
            input = self.rms_norm(input)
        # straight-through quantisers: the gradient is the full-precision layer's at any mix
        weight = self.weight + self.mix * (WeightQuant.apply(self.weight) - self.weight)
        input = input + self.mix * (ActQuant.apply(input) - input)
        return F.linear(input, weight, self.bias)


def set_quant_mix(model: nn.Module, mix: float) -> None:
    for module in model.modules():
        if isinstance(module, RampedBitLinear):
            module.mix = mix


def _wants_norm(name: str, subln: str) -> bool:
    return subln == "allnorm" or (subln == "paper" and name.rsplit(".", 1)[-1] in SUBLN_MODULES)


def _bitlinear_from(linear: nn.Linear, use_norm: bool, eps: float) -> RampedBitLinear:
    with torch.device("meta"):  # no throwaway random init; the original parameters are moved in
        layer = RampedBitLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              online_quant=True, use_rms_norm=use_norm, rms_norm_eps=eps)
    layer.weight = linear.weight
    layer.bias = linear.bias
    if use_norm:
        assert layer.rms_norm is not None  # AutoBitLinear builds it when use_rms_norm
        layer.rms_norm.weight = nn.Parameter(
            torch.ones(linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device))
    return layer


def convert_to_bitnet(model: nn.Module, subln: str = "paper", num_layers: Optional[int] = None) -> nn.Module:
    """Convert a transformers causal LM in place into a BitNet student and record the settings."""
    if subln not in choices(StudentConfig, "subln"):
        raise ValueError(f"subln must be one of {choices(StudentConfig, 'subln')}, not {subln!r}")
    if num_layers is not None:
        truncate_layers(model, num_layers)
    eps = getattr(model.config, "rms_norm_eps", 1e-6)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in NOT_CONVERTED:
            model.set_submodule(name, _bitlinear_from(module, _wants_norm(name, subln), eps))
    setattr(model.config, BITNET_CONFIG_KEY, {"subln": subln, "weights": "online"})
    return model


def truncate_layers(model: nn.Module, num_layers: int) -> None:
    """Keep the first `num_layers` decoder layers (a smaller student; its config says so)."""
    layers = model.get_decoder().layers  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module
    if not 0 < num_layers <= len(layers):
        raise ValueError(f"num_layers={num_layers} must be between 1 and the model's {len(layers)} layers")
    model.get_decoder().layers = layers[:num_layers]  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module
    config = cast("PreTrainedConfig", model.config)  # nn.Module.__getattr__ types it Tensor | Module
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]


def is_bitnet_student(model: nn.Module) -> bool:
    return isinstance(getattr(model.config, BITNET_CONFIG_KEY, None), dict)


@torch.no_grad()
def ternary_weights(layer: AutoBitLinear) -> torch.Tensor:
    """The weight the layer multiplies by, as {-1, 0, +1} (times one per-tensor scale)."""
    quantized = WeightQuant.apply(layer.weight)
    scale = layer.weight.abs().mean().clamp(min=1e-5)
    return torch.round(quantized / scale)
