"""Strict, atomic student checkpoints: an exact round trip, never overwritten, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from distillation.errors import DistillError
from distillation.student import convert_to_bitnet, load_student, save_student


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
    state.pop("model.layers.0.self_attn.attn_sub_norm.weight")  # stored under transformers BitNet name
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
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text("{}")
    with pytest.raises(DistillError, match="not a BitNet student"):
        load_student(tmp_path / "odd", dense=True)


def test_a_full_precision_model_trained_here_saves_as_transformers_does_and_loads_strictly(tiny_llama, tmp_path):
    """student.ternary=false (stage 0, the teacher's fine-tuning): no BitNet layers, and a folder
    plain `from_pretrained` (and so teacher.model) reads as the same model, in a process that cannot
    import the project."""
    from distillation.specs import StudentSpec
    from distillation.student import build_student
    from plain_transformers import plain_transformers

    tiny_llama.save_pretrained(tmp_path / "base")
    model = build_student(StudentSpec(None, str(tmp_path / "base"), "paper", None, False, ternary=False))
    assert not hasattr(model.config, "bitnet") and type(model).__name__ == "LlamaForCausalLM"
    save_student(model, tmp_path / "trained")
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(load_student(tmp_path / "trained", dense=True)(input_ids=ids).logits, want,
                                   rtol=0, atol=0)
    plain = plain_transformers([tmp_path / "trained"], ids, tmp_path)[str(tmp_path / "trained")]
    assert plain["class"] == "LlamaForCausalLM" and plain["linear"] == ["Linear"]
    torch.testing.assert_close(plain["logits"], want, rtol=0, atol=0)
    weights = load_file(tmp_path / "trained" / "model.safetensors")
    weights.pop(next(k for k in weights if k.endswith("down_proj.weight")))
    save_file(weights, tmp_path / "trained" / "model.safetensors")
    with pytest.raises(DistillError, match="not a BitNet student"):
        load_student(tmp_path / "trained")  # distill eval, export and generate take students only
    with pytest.raises(DistillError, match="does not match its config: missing \\['model.layers.\\d.mlp.down_proj.weight'\\]"):
        load_student(tmp_path / "trained", dense=True)


def test_a_truncated_full_precision_student_keeps_the_first_layers_and_loads_as_plain_transformers(tiny_llama, tmp_path):
    """student.ternary=false with num_layers: the depth-only reference (what truncation costs without
    ternary weights), a plain Llama of the first layers, weights as the original's."""
    from distillation.specs import StudentSpec
    from distillation.student import build_student

    tiny_llama.save_pretrained(tmp_path / "base")
    model = build_student(StudentSpec(None, str(tmp_path / "base"), "paper", 1, False, ternary=False))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 1
    assert len(model.model.layers) == 1
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, tiny_llama.model.layers[0].mlp.down_proj.weight,
                               rtol=0, atol=0)
    save_student(model, tmp_path / "trained")
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_student(tmp_path / "trained", dense=True)(input_ids=ids).logits,
                                   model(input_ids=ids).logits, rtol=0, atol=0)
