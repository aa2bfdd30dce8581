"""Student folders as plain transformers reads them: the same model, or a loud refusal; never another
model. Checked in a fresh interpreter where the project cannot be imported."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.integrations.bitnet import AutoBitLinear

from conftest import tiny_llama_config
from distillation.errors import DistillError
from distillation.student import convert_to_bitnet, load_student, save_student, set_compile
from plain_transformers import plain_transformers

FIXTURES = Path(__file__).parent / "fixtures"


def _student(config, subln: str, seed: int = 0):
    torch.manual_seed(seed)
    model = convert_to_bitnet(AutoModelForCausalLM.from_config(config), subln).eval()
    for module in model.modules():  # SubLN gains away from 1, so a norm read into the wrong place shows
        if isinstance(module, AutoBitLinear) and module.rms_norm is not None:
            module.rms_norm.weight.data.uniform_(0.5, 1.5)
    return model


def _qwen3_config():
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def test_plain_transformers_loads_each_student_as_the_same_model_or_refuses_it(tmp_path):
    set_compile(False)  # as the plain process runs them
    ids = torch.randint(0, 128, (2, 12))
    cases = {  # name: (model, the class plain transformers must build, or None for a refusal)
        "llama-paper": (_student(tiny_llama_config(), "paper"), "BitNetForCausalLM"),
        "llama-allnorm": (_student(tiny_llama_config(), "allnorm"), "LlamaForCausalLM"),
        "llama-none": (_student(tiny_llama_config(tie_word_embeddings=False), "none"), "LlamaForCausalLM"),
        "qwen3-allnorm": (_student(_qwen3_config(), "allnorm"), "Qwen3ForCausalLM"),
        "qwen3-paper": (_student(_qwen3_config(), "paper"), None),  # q/k norms: no stock class has SubLN
    }
    folders, expected = {}, {}
    for name, (model, _) in cases.items():
        folders[name] = save_student(model, tmp_path / name)
        with torch.no_grad():
            expected[name] = model(input_ids=ids).logits
        again = load_student(folders[name]).eval()  # and the project reads it back exactly
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids).logits, expected[name], rtol=0, atol=0)
    plain = plain_transformers(list(folders.values()), ids, tmp_path)
    for name, (_, cls) in cases.items():
        got = plain[str(folders[name])]
        if cls is None:
            assert "does not recognize this architecture" in got["error"] or "wrinklefree_subln" in got["error"], got
            note = json.loads((folders[name] / "config.json").read_text())["bitnet"]["not_loadable_by_transformers"]
            assert "q/k norms" in note and "student.subln=allnorm" in note
            continue
        assert got["class"] == cls and got["linear"] == ["AutoBitLinear", "Linear"], got  # ternary layers, dense head
        torch.testing.assert_close(got["logits"], expected[name], rtol=0, atol=0)  # the same computation, exactly


def test_paper_student_is_stored_with_transformers_bitnet_names(tmp_path):
    folder = save_student(_student(tiny_llama_config(), "paper"), tmp_path / "s")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["architectures"] == ["BitNetForCausalLM"]
    assert config["quantization_config"] == {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                             "quantization_mode": "online", "use_rms_norm": False,
                                             "rms_norm_eps": 1e-6, "modules_to_not_convert": ["lm_head"]}
    assert config["bitnet"] == {"subln": "paper", "weights": "online", "base_model_type": "llama", "version": 2}
    names = set(load_file(folder / "model.safetensors"))
    assert "model.layers.1.self_attn.attn_sub_norm.weight" in names and "model.layers.1.mlp.ffn_sub_norm.weight" in names
    assert not any(".rms_norm." in n for n in names) and "lm_head.weight" not in names  # tied: stored once


def test_folders_written_before_the_layout_still_load():
    set_compile(False)  # the fixtures' logits were computed eager (compiled quantizers round differently)
    expected = load_file(FIXTURES / "v1-expected.safetensors")
    student = load_student(FIXTURES / "v1-student").eval()
    packed = load_student(FIXTURES / "v1-packed").eval()
    with torch.no_grad():
        # equal up to the float summation order of this CPU's kernels (the fixture's logits came from
        # another machine; 7e-8 apart on 2026-12-05's), far below what a wrong load would move
        torch.testing.assert_close(student(input_ids=expected["input_ids"]).logits, expected["logits"], rtol=0,
                                   atol=1e-6)
        # the packed kernel sums int8 x ternary products exactly, training sums fp32 products: rounding apart
        torch.testing.assert_close(packed(input_ids=expected["input_ids"]).logits, expected["logits"],
                                   rtol=0, atol=1e-4)


def test_a_bad_student_folder_is_one_clear_error(tmp_path):
    folder = save_student(_student(tiny_llama_config(), "paper"), tmp_path / "s")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text("{not json")
    with pytest.raises(DistillError, match="unreadable config.json"):
        load_student(folder)
    del config["bitnet"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DistillError, match="not a BitNet student"):
        load_student(folder)


def test_the_default_students_load_in_plain_transformers_with_the_projects_logits(tmp_path, smollm2_dir):
    """The default job's student (SmolLM2's first 8 layers, paper SubLN) and an allnorm one, on real text."""
    from distillation.models import load_causal_lm, load_tokenizer

    set_compile(False)
    tokenizer = load_tokenizer(smollm2_dir)
    ids = torch.tensor([tokenizer("To be, or not to be, that is the question: whether 'tis nobler in the mind")
                        ["input_ids"]])
    folders, expected = [], []
    for subln in ("paper", "allnorm"):
        model = convert_to_bitnet(load_causal_lm(smollm2_dir, "float32"), subln, num_layers=8).eval()
        folders.append(save_student(model, tmp_path / subln, tokenizer=tokenizer))
        with torch.no_grad():
            expected.append(model(input_ids=ids).logits)
        del model
    plain = plain_transformers(folders, ids, tmp_path)
    for folder, want, cls in zip(folders, expected, ("BitNetForCausalLM", "LlamaForCausalLM")):
        assert plain[str(folder)]["class"] == cls
        torch.testing.assert_close(plain[str(folder)]["logits"], want, rtol=0, atol=0)
