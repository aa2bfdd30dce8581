"""`distill export` and `distill generate`: a student in each format, read back by `distill eval`,
transformers and llama.cpp; bad input is one line, exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from distillation import cli
from distillation.models import load_causal_lm, load_tokenizer
from distillation.student import convert_to_bitnet, save_student, set_compile
from distillation.student.generate import GenerateOptions, generate

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 6


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_teacher):
    set_compile(False)
    model = convert_to_bitnet(load_causal_lm(tiny_teacher, "float32"), "paper")
    return save_student(model, tmp_path_factory.mktemp("cli") / "student", tokenizer=load_tokenizer(tiny_teacher))


def _eval_bpb(folder: Path, text: Path, capsys) -> float:
    assert cli.main(["eval", str(folder), "--text", str(text)]) == 0
    return float(capsys.readouterr().out.split()[5])


def test_export_writes_each_format_and_eval_reads_the_folders(student_dir, tmp_path, capsys):
    text = tmp_path / "hamlet.txt"
    text.write_text(TEXT)
    reference = _eval_bpb(student_dir, text, capsys)
    for fmt, out in (("hf", tmp_path / "hf"), ("packed", tmp_path / "packed"), ("gguf", tmp_path / "s.gguf")):
        assert cli.main(["export", str(student_dir), str(out), "--format", fmt]) == 0
        line = capsys.readouterr().out
        assert line.startswith(f"{fmt} export written to {out}") and "MiB of weights" in line
        if fmt == "gguf":
            assert "Q8_0" in line  # 64-wide rows: no ternary type fits
            continue
        assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file() == (
            student_dir / "chat_template.jinja").is_file()
        assert _eval_bpb(out, text, capsys) == pytest.approx(reference, abs=1e-3)  # printed to 3 decimals


def test_generate_reads_every_form_of_the_student(student_dir, tmp_path):
    assert cli.main(["export", str(student_dir), str(tmp_path / "packed"), "--format", "packed"]) == 0
    assert cli.main(["export", str(student_dir), str(tmp_path / "s.gguf"), "--format", "gguf", "--gguf-type", "f16"]) == 0
    opts = GenerateOptions(max_new_tokens=8, raw=True)
    texts = {name: generate(str(path), "The king said", opts)
             for name, path in (("folder", student_dir), ("packed", tmp_path / "packed"), ("gguf", tmp_path / "s.gguf"))}
    assert all(isinstance(t, str) for t in texts.values()) and texts["folder"]
    assert texts["packed"] == texts["folder"]  # greedy, same ternary computation
    sampled = [generate(str(student_dir), "The king said", GenerateOptions(8, sample=True, seed=s, raw=True))
               for s in (0, 0, 1)]
    assert sampled[0] == sampled[1]  # seeded
    # The installed command, as a user types it (chat template applied: the tokenizer has one).
    done = subprocess.run([sys.executable, "-m", "distillation.cli", "generate", str(tmp_path / "s.gguf"), "Hello",
                           "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]


def test_the_old_distill_export_name_still_packs(student_dir, tmp_path, capsys):
    from distillation.student.export import main as old_main

    assert old_main([str(student_dir), str(tmp_path / "packed")]) == 0
    captured = capsys.readouterr()
    assert "distill export STUDENT OUT --format packed" in captured.err and "packed export written" in captured.out
    assert (tmp_path / "packed" / "config.json").is_file()


@pytest.mark.parametrize("case", ["not_a_student", "exists", "no_parent", "unwritable", "gguf_suffix",
                                  "allnorm_gguf", "already_packed", "bad_format", "generate_missing", "generate_tokens"])
def test_bad_input_is_one_error_line_and_exit_2_with_nothing_written(case, student_dir, tiny_teacher, tmp_path, capsys):
    out, source, fmt = tmp_path / "out", str(student_dir), "hf"
    if case == "not_a_student":
        source = str(tiny_teacher)
    elif case == "exists":
        out.mkdir()
    elif case == "no_parent":
        out = tmp_path / "missing" / "out"
    elif case == "unwritable":
        out = Path("/proc/distill-export")
    elif case == "gguf_suffix":
        fmt = "gguf"
    elif case == "allnorm_gguf":
        source = str(save_student(convert_to_bitnet(load_causal_lm(tiny_teacher, "float32"), "allnorm"),
                                  tmp_path / "allnorm", tokenizer=load_tokenizer(tiny_teacher)))
        out, fmt = tmp_path / "a.gguf", "gguf"
    elif case == "already_packed":
        assert cli.main(["export", source, str(tmp_path / "packed"), "--format", "packed"]) == 0
        capsys.readouterr()
        source = str(tmp_path / "packed")
    elif case == "bad_format":
        fmt = "onnx"
    before = sorted(p.name for p in tmp_path.iterdir())
    if case.startswith("generate"):
        args = ["generate", str(tmp_path / "nowhere") if case == "generate_missing" else source, "hi"]
        args += ["--max-new-tokens", "0"] if case == "generate_tokens" else []
    else:
        args = ["export", source, str(out), "--format", fmt]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and captured.err.startswith("error: "), captured
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written, nothing left over
    expected = {"not_a_student": "not a BitNet student", "exists": "already exists", "no_parent": "does not exist",
                "unwritable": "is not writable", "gguf_suffix": "ending in .gguf", "already_packed": "already packed",
                "allnorm_gguf": "paper's two sub-norms", "bad_format": "invalid choice",
                "generate_missing": "does not exist", "generate_tokens": "--max-new-tokens"}[case]
    assert expected in captured.err


def test_an_export_the_student_cannot_take_stops_the_run_before_it_starts(tiny_teacher, tmp_path, capsys):
    args = tiny_overrides(tiny_teacher, tmp_path) + ["student.subln=allnorm", "student.export=[packed,gguf]"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: student.export=gguf cannot hold this student") and len(err.splitlines()) == 1
    assert not (tmp_path / "e2e").exists()
    assert cli.main(tiny_overrides(tiny_teacher, tmp_path) + ["student.export=[onnx]"]) == 2
    assert "'onnx' is not one of hf, packed, gguf" in capsys.readouterr().err


def test_loading_a_packed_student_allocates_no_dense_bitlinear(student_dir, tmp_path):
    from distillation.student import load_student

    assert cli.main(["export", str(student_dir), str(tmp_path / "packed"), "--format", "packed"]) == 0
    model = load_student(tmp_path / "packed")
    tensors = [t for t in list(model.parameters()) + list(model.buffers())]
    dense = sum(t.numel() for t in tensors if t.dtype == torch.float32 and t.dim() == 2)
    assert dense == model.get_input_embeddings().weight.numel()  # the (tied) embedding is the only matrix
