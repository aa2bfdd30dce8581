"""Packed students: 2 bits per ternary weight in memory, the CPU kernel against float64 and against
transformers' own quantizers and layouts, and the packed folder in plain transformers."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.bitnet import ActQuant, AutoBitLinear, pack_weights, unpack_weights

from conftest import tiny_llama_config
from distillation.student import convert_to_bitnet, load_student, save_student, set_compile
from distillation.student import ternary_kernel as tk
from distillation.student.export import export_student
from distillation.student.packed import TernaryLinear, unpack_transformers
from plain_transformers import plain_transformers

SIMD = {"native": ("-march=native",), "avx2": ("-march=native", "-mno-avx512f"),
        "plain C": ("-march=native", "-mno-avx512f", "-mno-avx2")}


@pytest.mark.parametrize("level", list(SIMD))
def test_kernel_equals_the_float64_reference_at_each_simd_level(level):
    import platform

    if level != "native" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX2 and plain-C builds are x86 flags; other CPUs build the native kernel only")
    lib = tk._build(SIMD[level])
    assert lib is not None, "no C compiler: the kernel cannot be tested here"
    assert lib.ternary_simd_level() <= {"native": 3, "avx2": 2, "plain C": 0}[level]
    torch.manual_seed(0)
    for t, k, n in [(1, 576, 1536), (7, 100, 8), (33, 1536, 192)]:  # decode, a ragged width, prefill
        w = torch.randint(-1, 2, (n, k), dtype=torch.int8)
        x, bias = torch.randn(t, k) * 3, torch.randn(n)
        x[0, 5] = 40.0  # an outlier sets the token's scale, as in real activations
        y = tk.kernel_path(lib, x, tk.pack_codes(w), k, 0.037, bias)
        # transformers' ActQuant, dequantized, times the ternary matrix, in float64
        reference = (ActQuant.apply(x).double() @ w.double().T) * 0.037 + bias.double()
        torch.testing.assert_close(y.double(), reference, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(tk.torch_path(x, tk.pack_codes(w), k, 0.037, bias).double(), reference,
                                   rtol=1e-6, atol=1e-5)


def test_activation_quantization_is_transformers_actquant_exactly():
    lib = tk.kernel()
    torch.manual_seed(1)
    x = torch.randn(5, 300) * torch.tensor([0.01, 1.0, 100.0, 1e-7, 3.0])[:, None]  # one row under the 1e-5 clamp
    q, scale, qsum = torch.empty(5, 384, dtype=torch.int8), torch.empty(5), torch.empty(5, dtype=torch.int32)
    lib.ternary_act_quant(x.data_ptr(), 5, 300, 384, q.data_ptr(), scale.data_ptr(), qsum.data_ptr())
    assert torch.equal(q[:, :300].float() / scale[:, None], ActQuant.apply(x))  # same integers, same scale
    assert not q[:, 300:].any() and torch.equal(qsum, q.int().sum(1))


def test_code_layouts_round_trip_and_match_transformers_unpacking():
    w = torch.randint(-1, 2, (12, 300), dtype=torch.int8)
    assert torch.equal(tk.unpack_codes(tk.pack_codes(w), 300), w)
    assert tk.pack_codes(w).shape == (12, 384 // 4)  # 2 bits per weight, rows padded to 128 inputs
    hf = pack_weights(w.clone())
    assert torch.equal(unpack_transformers(hf), unpack_weights(hf, dtype=torch.int8))


def _trained_like(config, subln, seed=0):
    torch.manual_seed(seed)
    model = convert_to_bitnet(AutoModelForCausalLM.from_config(config), subln).eval()
    for module in model.modules():
        if isinstance(module, AutoBitLinear):
            if module.rms_norm is not None:
                module.rms_norm.weight.data.uniform_(0.5, 1.5)
            if module.bias is not None:
                module.bias.data.normal_(0, 0.5)
    return model


def _qwen2_config():  # q/k/v biases: the packed layout's bias handling is exercised
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def test_packed_export_keeps_two_bits_per_weight_and_the_students_outputs(tmp_path):
    set_compile(False)
    ids = torch.randint(0, 128, (2, 12))
    cases = {"llama-paper": _trained_like(tiny_llama_config(), "paper"),
             "llama-allnorm": _trained_like(tiny_llama_config(), "allnorm"),
             "qwen2-allnorm": _trained_like(_qwen2_config(), "allnorm")}
    packed_dirs, expected = [], {}
    for name, model in cases.items():
        with torch.no_grad():
            expected[name] = model(input_ids=ids).logits
        src = save_student(model, tmp_path / name)
        export_student(src, tmp_path / f"{name}-packed", "packed")
        packed_dirs.append(tmp_path / f"{name}-packed")
        config = json.loads((tmp_path / f"{name}-packed" / "config.json").read_text())
        assert config["quantization_config"]["quantization_mode"] == "offline" and config["bitnet"]["weights"] == "packed"
        packed = load_student(tmp_path / f"{name}-packed").eval()
        layers = [m for m in packed.modules() if isinstance(m, TernaryLinear)]
        assert len(layers) == 2 * 7 and not any(isinstance(m, AutoBitLinear) for m in packed.modules())
        for layer in layers:  # the codes are all a layer holds of its weight: 2 bits each, rows padded to 128
            assert layer.codes.dtype == torch.uint8 and layer.codes.numel() == layer.out_features * tk.padded(
                layer.in_features) // 4
        with torch.no_grad():  # integer sums against fp32 sums: rounding apart (bit-level flips of int8 activations)
            torch.testing.assert_close(packed(input_ids=ids).logits, expected[name], rtol=0, atol=1e-4)
    plain = plain_transformers(packed_dirs, ids, tmp_path)
    for name, folder in zip(cases, packed_dirs):
        got = plain[str(folder)]
        assert got["linear"] == ["AutoBitLinear", "Linear"], got
        torch.testing.assert_close(got["logits"], expected[name], rtol=0, atol=1e-4)
