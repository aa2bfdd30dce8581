"""Stage 1 conversion on transformers' AutoBitLinear, and strict, atomic checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.integrations.bitnet import AutoBitLinear

from distillation.errors import DistillError
from distillation.student import convert_to_bitnet, load_student, save_student, ternary_weights


def _bitlinears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, AutoBitLinear)}


def test_every_linear_but_lm_head_becomes_bitlinear_with_subln_before_o_and_down_proj(tiny_llama):
    convert_to_bitnet(tiny_llama, "paper")
    layers = _bitlinears(tiny_llama)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not any(type(m) is nn.Linear for name, m in tiny_llama.named_modules() if name != "lm_head")
    with_norm = {name.rsplit(".", 1)[-1] for name, m in layers.items() if m.rms_norm is not None}
    assert with_norm == {"o_proj", "down_proj"}
    assert tiny_llama.config.bitnet["subln"] == "paper"


def test_allnorm_and_none_placements(tiny_llama):
    from copy import deepcopy

    every = convert_to_bitnet(deepcopy(tiny_llama), "allnorm")
    assert all(m.rms_norm is not None for m in _bitlinears(every).values())
    bare = convert_to_bitnet(tiny_llama, "none")
    assert not any(m.rms_norm is not None for m in _bitlinears(bare).values())
    with pytest.raises(ValueError, match="subln"):
        convert_to_bitnet(bare, "sometimes")


def test_conversion_keeps_weights_and_quantizes_them_to_three_levels(tiny_llama):
    original = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    convert_to_bitnet(tiny_llama)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.weight.detach(), original)  # fp32 master weights kept as they were
    levels = set(ternary_weights(layer).unique().tolist())
    assert levels <= {-1.0, 0.0, 1.0} and len(levels) == 3


def test_straight_through_gradients_reach_master_weights(tiny_llama):
    convert_to_bitnet(tiny_llama)
    ids = torch.randint(0, 128, (2, 9))
    tiny_llama(input_ids=ids, labels=ids).loss.backward()
    grad = tiny_llama.model.layers[0].mlp.gate_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_num_layers_truncates_the_student(tiny_llama):
    convert_to_bitnet(tiny_llama, num_layers=1)
    assert len(tiny_llama.model.layers) == 1 and tiny_llama.config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="num_layers"):
        convert_to_bitnet(tiny_llama, num_layers=5)


def test_checkpoint_round_trip_is_exact_and_strict(tiny_llama, tmp_path):
    convert_to_bitnet(tiny_llama, "allnorm")
    tiny_llama.eval()
    out = save_student(tiny_llama, tmp_path / "student")
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".student*"))
    assert json.loads((out / "config.json").read_text())["bitnet"]["subln"] == "allnorm"
    again = load_student(out).eval()
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, tiny_llama(input_ids=ids).logits, rtol=0, atol=0)


def test_checkpoint_is_never_overwritten_and_missing_weights_fail(tiny_llama, tmp_path):
    convert_to_bitnet(tiny_llama)
    out = save_student(tiny_llama, tmp_path / "student")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(DistillError, match="refusing to overwrite"):
        save_student(tiny_llama, out)
    assert (out / "model.safetensors").read_bytes() == before

    state = load_file(out / "model.safetensors")
    state.pop("model.layers.0.self_attn.o_proj.rms_norm.weight")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((out / "config.json").read_text())
    save_file(state, broken / "model.safetensors")
    with pytest.raises(DistillError, match="missing .*o_proj.rms_norm"):
        load_student(broken)


def test_loading_a_nonexistent_or_non_bitnet_checkpoint_fails_clearly(tiny_llama, tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        load_student(tmp_path / "nowhere")
    tiny_llama.save_pretrained(tmp_path / "plain")
    with pytest.raises(DistillError, match="not a BitNet student"):
        load_student(tmp_path / "plain")
