"""What a student folder says to plain transformers, so that `from_pretrained` builds the same model
or refuses it; never a different one.

In memory every student is its base architecture (Llama, Qwen3, ...) with transformers'
`AutoBitLinear` layers, SubLN being that layer's input norm (student/bitnet.py). On disk:

  paper SubLN, Llama-shaped base -> `model_type: bitnet` (BitNetForCausalLM: Llama plus
                                    `self_attn.attn_sub_norm` before o_proj and `mlp.ffn_sub_norm`
                                    before down_proj, the paper's placement)
  allnorm                        -> the base architecture, `use_rms_norm: true` (a norm before every
                                    BitLinear: the official BitDistill code's variant)
  none                           -> the base architecture, `use_rms_norm: false`
  paper SubLN on anything else   -> a `model_type` transformers does not know, so `from_pretrained`
                                    fails loudly (no stock class puts a norm before only two layers)

Ternary behaviour comes from the `quantization_config` block (quant_method bitnet): `online` keeps the
latent fp32 weights (ternarised each forward, exactly as in training); `offline` stores 2 bits per
weight in transformers' `pack_weights` layout with `weight_scale` = mean|W| (AutoBitLinear multiplies
by it). The project's own block (`bitnet`: subln, weights, base model type, version) lets
`load_student` rebuild the in-memory layout from any of these, and from version-1 folders.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

LAYOUT_VERSION = 2
NOT_CONVERTED = ["lm_head"]
# Our names (AutoBitLinear's input norm) against BitNetForCausalLM's for the paper's two sub-norms.
BITNET_RENAMES = ((".self_attn.o_proj.rms_norm.weight", ".self_attn.attn_sub_norm.weight"),
                  (".mlp.down_proj.rms_norm.weight", ".mlp.ffn_sub_norm.weight"))
BITNET_BASES = ("llama",)  # BitNetForCausalLM is Llama's attention, MLP and norms, nothing else


def bitnet_arch_problem(config) -> Optional[str]:
    """Why `BitNetForCausalLM` cannot hold a paper-SubLN student of this base architecture (None: it can)."""
    if config.model_type not in BITNET_BASES:
        return (f"transformers' BitNet class is Llama with two sub-norms; a {config.model_type} model "
                f"({'q/k norms, ' if config.model_type.startswith('qwen3') else ''}its own layers) has no stock class "
                "with a norm before only o_proj and down_proj")
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if heads * head_dim != hidden:
        return f"BitNet's attention sub-norm is hidden_size wide, but heads x head_dim = {heads} x {head_dim} != {hidden}"
    if getattr(config, "mlp_bias", False):
        return "BitNet's MLP has no biases, this model's has"
    return None


@dataclass(frozen=True)
class Layout:
    """How one student is written: its config.json and the names of its tensors."""
    model_type: str
    architectures: Tuple[str, ...]
    use_rms_norm: bool
    renames: Tuple[Tuple[str, str], ...] = ()
    refusal: Optional[str] = None  # why no transformers class represents it (then model_type is unknown on purpose)


def layout_for(config, subln: str) -> Layout:
    base = config.model_type
    arch = tuple(getattr(config, "architectures", None) or ())
    if subln != "paper":
        return Layout(base, arch, use_rms_norm=subln == "allnorm")
    problem = bitnet_arch_problem(config)
    if problem is None:
        return Layout("bitnet", ("BitNetForCausalLM",), use_rms_norm=False, renames=BITNET_RENAMES)
    return Layout(f"wrinklefree_subln_{base}", arch, use_rms_norm=False, refusal=problem)


def quantization_config(layout: Layout, mode: str, eps: float) -> dict:
    """transformers' BitNetQuantConfig as config.json holds it: `online` latent weights or `offline` packed."""
    return {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": mode,
            "use_rms_norm": layout.use_rms_norm, "rms_norm_eps": eps, "modules_to_not_convert": NOT_CONVERTED}


def saved_config(config, subln: str, weights: str) -> Tuple[dict, Layout]:
    """config.json for a student of `config` (its in-memory base config) with `weights` online | packed."""
    layout = layout_for(config, subln)
    saved = config.to_dict()
    base = saved["model_type"]
    saved.pop("bitnet", None)
    saved.update(model_type=layout.model_type, architectures=list(layout.architectures), dtype="float32",
                 quantization_config=quantization_config(layout, "offline" if weights == "packed" else "online",
                                                         getattr(config, "rms_norm_eps", 1e-6)),
                 bitnet={"subln": subln, "weights": weights, "base_model_type": base, "version": LAYOUT_VERSION})
    if layout.refusal:
        saved["bitnet"]["not_loadable_by_transformers"] = (
            f"{layout.refusal}; load it with distillation.student.load_student, or train with student.subln=allnorm "
            "for a folder plain transformers loads")
    return saved, layout


def base_config(saved: dict):
    """The in-memory base config of a saved student (any layout version)."""
    from transformers import CONFIG_MAPPING

    settings = saved["bitnet"]
    base = settings.get("base_model_type", saved["model_type"])
    fields = {k: v for k, v in saved.items() if k not in ("quantization_config", "model_type")}
    fields["architectures"] = [a for a in fields.get("architectures") or [] if a != "BitNetForCausalLM"] or None
    config = CONFIG_MAPPING[base].from_dict(fields)
    return config


def renames_for(saved: dict) -> Tuple[Tuple[str, str], ...]:
    return BITNET_RENAMES if saved["model_type"] == "bitnet" else ()


def to_disk_names(state: Dict, renames) -> Dict:
    return {_rename(k, renames, 0, 1): v for k, v in state.items()}


def from_disk_names(state: Dict, renames) -> Dict:
    return {_rename(k, renames, 1, 0): v for k, v in state.items()}


def _rename(key: str, renames, src: int, dst: int) -> str:
    for pair in renames:
        if key.endswith(pair[src]):
            return key[: -len(pair[src])] + pair[dst]
    return key
