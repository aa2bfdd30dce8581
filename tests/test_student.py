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
    for name, module in _bitlinears(tiny_llama).items():
        levels = set(ternary_weights(module).unique().tolist())
        assert levels == {-1.0, 0.0, 1.0}, (name, levels)


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


def _tiny_qwen(family):
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config_class = getattr(transformers, f"{family}Config")
    extra = {"head_dim": 16} if family == "Qwen3" else {}
    return AutoModelForCausalLM.from_config(config_class(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **extra))


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3"])
def test_qwen_families_convert_train_and_round_trip(tmp_path, family):
    model = convert_to_bitnet(_tiny_qwen(family), "paper")
    assert len(_bitlinears(model)) == 2 * 7 and type(model.lm_head) is nn.Linear
    ids = torch.randint(0, 128, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    again = load_student(save_student(model, tmp_path / family)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_conversion_keeps_full_precision_outputs_when_quantization_is_off(tiny_llama, monkeypatch):
    from copy import deepcopy

    from transformers.integrations import bitnet as hf_bitnet

    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        reference = tiny_llama.eval()(input_ids=ids).logits
        student = convert_to_bitnet(deepcopy(tiny_llama), "none").eval()
        quantized = student(input_ids=ids).logits
        # The quantizers become identities: what is left is the conversion itself.
        monkeypatch.setattr(hf_bitnet.WeightQuant, "apply", lambda w: w)
        monkeypatch.setattr(hf_bitnet.ActQuant, "apply", lambda x: x)
        unquantized = student(input_ids=ids).logits
    torch.testing.assert_close(unquantized, reference, rtol=1e-5, atol=1e-5)
    assert (quantized - reference).abs().max() > 1e-3  # and with quantization on, it does change


@pytest.mark.parametrize("subln", ["paper", "allnorm"])
def test_packed_export_reproduces_training_outputs_and_stores_2_bits_per_weight(tiny_llama, tmp_path, subln):
    from distillation.student import linear_weight_bytes, pack_student
    from distillation.student.export import export_packed
    from distillation.student.packed import PackedBitLinear
    from distillation.training.student_init import set_compile

    set_compile(False)
    convert_to_bitnet(tiny_llama, subln)
    for module in tiny_llama.modules():  # SubLN gains away from 1, so a wrong copy would show
        if isinstance(module, AutoBitLinear) and module.rms_norm is not None:
            module.rms_norm.weight.data.uniform_(0.5, 1.5)
    tiny_llama.eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        trained = tiny_llama(input_ids=ids).logits
    src = save_student(tiny_llama, tmp_path / "student")
    sizes = export_packed(src, tmp_path / "packed")
    packed = load_student(tmp_path / "packed").eval()
    assert packed.config.bitnet["weights"] == "packed"
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, trained, rtol=0, atol=0)  # bit for bit
    matrices = [m for m in packed.modules() if isinstance(m, PackedBitLinear)]
    # 2 bits per weight plus one fp32 scale per matrix, against 16 bits per weight
    assert sizes["stored"] == sum(m.in_features * m.out_features // 4 + 4 for m in matrices)
    assert sizes["fp16"] == sum(m.in_features * m.out_features * 2 for m in matrices)
    assert linear_weight_bytes(pack_student(load_student(src)))["stored"] == sizes["stored"]
    with pytest.raises(DistillError, match="already packed"):
        export_packed(tmp_path / "packed", tmp_path / "again")
