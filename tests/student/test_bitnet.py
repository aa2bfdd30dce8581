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


def _reference_bitlinear(x, w, b, norm_w, eps, mix):
    """Float64, from the BitNet b1.58 definitions (absmean ternary weights, per-token absmax int8
    activations, straight-through), blended as the warm-up blends them; written out here, not
    taken from transformers or the project."""
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_w  # SubLN (RMSNorm)
    w_scale = w.abs().mean().clamp(min=1e-5)
    w_q = (w / w_scale).round().clamp(-1, 1) * w_scale
    x_scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-5) / 127
    x_q = (x / x_scale).round().clamp(-128, 127) * x_scale
    w_mixed = w + mix * (w_q - w).detach()
    x_mixed = x + mix * (x_q - x).detach()
    return x_mixed @ w_mixed.T + b


@pytest.mark.parametrize("mix", [0.0, 0.3, 0.75, 1.0])
def test_the_warm_up_blends_the_full_precision_and_ternary_layer_as_the_reference_does(mix):
    """mix 0 is the full-precision layer (with its SubLN), mix 1 transformers' own AutoBitLinear,
    and every mix matches a float64 reference, values and gradients."""
    from distillation.student.bitnet import RampedBitLinear, set_quant_mix

    torch.manual_seed(0)
    dense = nn.Linear(48, 24)
    dense.weight.data.mul_(3)
    layer = RampedBitLinear(48, 24, bias=True, online_quant=True, use_rms_norm=True, rms_norm_eps=1e-6)
    layer.load_state_dict({**dense.state_dict(), "rms_norm.weight": 1 + 0.1 * torch.randn(48)})
    set_quant_mix(nn.Sequential(layer), mix)
    x = torch.randn(3, 5, 48, requires_grad=True)
    out = layer(x)
    out.backward(torch.ones_like(out) + torch.arange(24.0) / 24)

    x64 = x.detach().double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in (layer.weight, layer.bias, layer.rms_norm.weight)]
    ref = _reference_bitlinear(x64, *params64[:2], params64[2], 1e-6, mix)
    ref.backward(torch.ones_like(ref) + torch.arange(24.0, dtype=torch.float64) / 24)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    for p, p64 in zip((layer.weight, layer.bias, layer.rms_norm.weight), params64):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-4)

    if mix == 0.0:  # the layer it was converted from, after its SubLN
        torch.testing.assert_close(out, dense(layer.rms_norm(x)))
    if mix == 1.0:  # transformers' layer itself, unchanged
        theirs = AutoBitLinear(48, 24, bias=True, online_quant=True, use_rms_norm=True, rms_norm_eps=1e-6)
        theirs.load_state_dict(layer.state_dict())
        torch.testing.assert_close(out, theirs(x))


def test_the_ramp_rises_from_zero_to_one_over_the_warm_up_and_is_one_after():
    from distillation.specs import QuantRamp

    for schedule in ("linear", "sigmoid"):
        ramp = QuantRamp(8, schedule)
        mixes = [ramp.mix(done) for done in range(12)]
        assert mixes[0] == 0.0 and mixes[8:] == [1.0] * 4
        assert all(a < b for a, b in zip(mixes[:9], mixes[1:9])), (schedule, mixes)  # strictly rising
    assert QuantRamp(8).mix(2) == 0.25 and QuantRamp(8, "sigmoid").mix(4) == pytest.approx(0.5)
    assert QuantRamp().mix(0) == 1.0  # no warm-up: ternary from the first step
