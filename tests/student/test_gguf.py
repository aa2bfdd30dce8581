"""GGUF exports run by llama.cpp itself (llama-cpp-python, the `llama` extra that `make test` installs):
the same tokens, the same computation up to activation rounding, the same greedy text."""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import bitnet as hf_bitnet

from conftest import tiny_llama_config
from distillation.errors import DistillError
from distillation.models import load_causal_lm, load_tokenizer
from distillation.student import convert_to_bitnet, load_student, save_student, set_compile
from distillation.student.export import export_student
from distillation.student.generate import greedy_gguf, greedy_torch, open_gguf

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "To be, or not to be, that is",
           "In 1815, at 12:30, the 3 ships", "Once upon a time, in a small village,"]
TEXT = ("Python's for statement iterates over the items of any sequence (a list or a string), in the order that "
        "they appear in the sequence. For example: words = ['cat', 'window', 'defenestrate'] has 3 items; 2026-12-04.")


@pytest.fixture(scope="module")
def smollm2_student(tmp_path_factory, smollm2_dir):
    """The default job's student shape: SmolLM2's first 8 layers, paper SubLN, with its tokenizer."""
    set_compile(False)
    model = convert_to_bitnet(load_causal_lm(smollm2_dir, "float32"), "paper", num_layers=8)
    return save_student(model, tmp_path_factory.mktemp("gguf") / "student", tokenizer=load_tokenizer(smollm2_dir))


def _llama_logits(path, ids):
    llm = open_gguf(path, n_ctx=512, logits_all=True)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    finally:
        llm.close()


def _torch_logits(model, ids, activation_rounding=True):
    with torch.inference_mode():
        if activation_rounding:
            return model(input_ids=torch.tensor([ids])).logits[0]
        original = hf_bitnet.ActQuant.apply
        hf_bitnet.ActQuant.apply = lambda x: x
        try:
            return model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            hf_bitnet.ActQuant.apply = original


def test_f16_gguf_is_the_student_without_activation_rounding(smollm2_student, tmp_path):
    """llama.cpp does not quantize activations per token as training does; with every weight in F16
    that is the only difference left, so this checks the architecture, names, norms, rope and tokenizer."""
    report = export_student(smollm2_student, tmp_path / "f16.gguf", "gguf", "f16")
    assert report["gguf_tensor_types"] == {"F16": 1 + 8 * 7, "F32": 1 + 8 * 4}
    tokenizer, model = load_tokenizer(smollm2_student), load_student(smollm2_student).eval()
    llm = open_gguf(tmp_path / "f16.gguf")
    for text in [TEXT, *PROMPTS, "<|im_start|>user\nHi<|im_end|>", "naïve café, 東京 ½"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"], text
    llm.close()
    ids = tokenizer(TEXT)["input_ids"]
    got, want = _llama_logits(tmp_path / "f16.gguf", ids), _torch_logits(model, ids, activation_rounding=False)
    assert (got - want).abs().max() < 2e-2 * want.abs().max()  # fp16 weights and embeddings
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_ternary_gguf_greedy_tokens_are_the_students(smollm2_student, tmp_path):
    report = export_student(smollm2_student, tmp_path / "s.gguf", "gguf", "tq2_0")
    # 576-wide rows take Q8_0; down_proj's 1536-wide rows the ternary type
    assert report["gguf_tensor_types"] == {"F16": 1, "F32": 1 + 8 * 4, "Q8_0": 8 * 6, "TQ2_0": 8}
    reader = gguf.GGUFReader(tmp_path / "s.gguf")
    assert reader.fields["general.architecture"].contents() == "bitnet"
    tokenizer, model = load_tokenizer(smollm2_student), load_student(smollm2_student).eval()
    # The rounding between the two: llama.cpp's 8-bit activation blocks against training's per-token int8.
    ids = tokenizer(TEXT)["input_ids"]
    llama, student = _llama_logits(tmp_path / "s.gguf", ids), _torch_logits(model, ids)
    own_rounding = (student - _torch_logits(model, ids, activation_rounding=False)).abs().max()
    noise = (llama - student).abs().max()
    assert noise <= 2 * own_rounding, (noise, own_rounding)  # no larger than the student's own activation rounding
    llm = open_gguf(tmp_path / "s.gguf")
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ours, theirs = greedy_torch(model, prompt_ids, 32), greedy_gguf(llm, prompt_ids, 32, stop_at_eos=False)
        if ours == theirs:
            continue
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        # Allowed only late, or where the student itself hesitates between the two tokens by less than the noise.
        logits = _torch_logits(model, prompt_ids + ours[:first])[-1]
        margin = float(logits[ours[first]] - logits[theirs[first]])
        assert first >= 16 or margin <= 2 * noise, (prompt, first, margin, float(noise))
    llm.close()


def test_rows_of_256_take_the_ternary_types_everywhere(tmp_path, smollm2_dir):
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=49152, hidden=256, heads=4, kv_heads=2)
    model = convert_to_bitnet(AutoModelForCausalLM.from_config(config), "paper").eval()
    folder = save_student(model, tmp_path / "s", tokenizer=load_tokenizer(smollm2_dir))
    ids = load_tokenizer(smollm2_dir)(TEXT)["input_ids"]
    student = _torch_logits(model, ids)
    own_rounding = (student - _torch_logits(model, ids, activation_rounding=False)).abs().max()
    for kind in ("tq2_0", "tq1_0"):
        report = export_student(folder, tmp_path / f"{kind}.gguf", "gguf", kind)
        assert report["gguf_tensor_types"] == {"F16": 1, "F32": 1 + 2 * 4, kind.upper(): 2 * 7}
        assert (_llama_logits(tmp_path / f"{kind}.gguf", ids) - student).abs().max() <= 2 * own_rounding


def test_students_llama_cpp_cannot_hold_are_refused_before_writing(tmp_path, smollm2_dir):
    allnorm = save_student(convert_to_bitnet(AutoModelForCausalLM.from_config(tiny_llama_config()), "allnorm"),
                           tmp_path / "allnorm")
    with pytest.raises(DistillError, match="bitnet architecture has the paper's two sub-norms"):
        export_student(allnorm, tmp_path / "a.gguf", "gguf")
    untied = save_student(convert_to_bitnet(AutoModelForCausalLM.from_config(
        tiny_llama_config(tie_word_embeddings=False)), "paper"), tmp_path / "untied")
    with pytest.raises(DistillError, match="lm_head is untied"):
        export_student(untied, tmp_path / "u.gguf", "gguf")
    paper = save_student(convert_to_bitnet(AutoModelForCausalLM.from_config(tiny_llama_config()), "paper"),
                         tmp_path / "paper")
    with pytest.raises(DistillError, match="no tokenizer.json"):
        export_student(paper, tmp_path / "p.gguf", "gguf")
    with pytest.raises(DistillError, match="ending in .gguf"):
        export_student(paper, tmp_path / "p.bin", "gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allnorm", "paper", "untied"]  # nothing half-written
