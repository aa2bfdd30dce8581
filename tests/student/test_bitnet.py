"""Stage 1 conversion on transformers' AutoBitLinear: SubLN placements, ternary weights, straight-through
gradients, truncation and the Qwen families."""


import pytest
import torch
from torch import nn
from transformers.integrations.bitnet import AutoBitLinear

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
