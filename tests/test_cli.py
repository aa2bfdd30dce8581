"""`distill eval`: bits/byte and nats/token of a saved student (and its teacher) on text files, no Ray."""

import math

import pytest
import torch

from distillation import cli
from distillation.config.loader import config_dir
from distillation.models import load_causal_lm, load_tokenizer
from distillation.student import convert_to_bitnet, load_student, save_student
from distillation.training.evaluate import score_text

SEQ_LEN = 64
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles. Café, naïve, façade — "
        "déjà vu; 東京 and 🙂 cost more than one byte each.\n") * 4
OTHER = "def main(argv=None):\n    return 0\n\nprint(main())\n" * 6


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_teacher):
    model = convert_to_bitnet(load_causal_lm(tiny_teacher, "float32"), "paper")
    return save_student(model, tmp_path_factory.mktemp("eval") / "student", tokenizer=load_tokenizer(tiny_teacher))


@pytest.fixture
def texts(tmp_path):
    first, second = tmp_path / "hamlet.txt", tmp_path / "code.py"
    first.write_text(TEXT, encoding="utf-8")
    second.write_text(OTHER, encoding="utf-8")
    return first, second


def _fields(line: str) -> dict:
    words = line.split()
    return {"model": words[0], "file": words[1], "nats/token": words[3], "bits/byte": words[5],
            "tokens": int(words[7].replace(",", ""))}


def _direct_nats(model, tokenizer, text: str):
    """Total nats, predicted tokens and their bytes, from transformers' own shifted loss per row."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nats, tokens, num_bytes = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids), SEQ_LEN):
            piece = torch.tensor([ids[start:start + SEQ_LEN]])
            if piece.shape[1] < 2:
                continue
            nats += model(input_ids=piece, labels=piece).loss.item() * (piece.shape[1] - 1)
            tokens += piece.shape[1] - 1
            num_bytes += len(tokenizer.decode(piece[0, 1:]).encode("utf-8"))
    return nats, tokens, num_bytes


def test_eval_never_imports_ray(student_dir, texts):
    import subprocess
    import sys

    code = ("import sys; from distillation import cli; "
            f"rc = cli.main(['eval', {str(student_dir)!r}, '--text', {str(texts[0])!r}]); "
            "print('ray imported' if 'ray' in sys.modules else 'no ray', rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-1] == "no ray 0", done.stdout + done.stderr


def test_eval_prints_one_line_per_file_with_the_shared_scoring_function(student_dir, texts, capsys):
    assert cli.main(["eval", str(student_dir), "--text", *map(str, texts), "--seq-len", str(SEQ_LEN)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and err == ""
    model, tokenizer = load_student(student_dir), load_tokenizer(student_dir)
    for line, path in zip(lines, texts):
        fields = _fields(line)
        assert fields["model"] == "student" and fields["file"] == str(path)
        direct = score_text(model, tokenizer, path.read_text(encoding="utf-8"), SEQ_LEN)
        assert fields["bits/byte"] == f"{direct['bits_per_byte']:.3f}"
        assert fields["nats/token"] == f"{direct['loss']:.3f}"
        assert fields["tokens"] == direct["tokens"]
        # bits/byte is the same total of nats, over ln 2 and the predicted tokens' UTF-8 bytes
        nats, tokens, num_bytes = _direct_nats(model, tokenizer, path.read_text(encoding="utf-8"))
        assert (direct["tokens"], direct["bytes"]) == (tokens, num_bytes)
        assert direct["loss"] == pytest.approx(nats / tokens, rel=1e-4)
        assert direct["bits_per_byte"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-4)
        assert direct["bits_per_byte"] == pytest.approx(direct["loss"] * tokens / math.log(2) / num_bytes, rel=1e-9)
        assert 0 < num_bytes <= len(path.read_bytes())
    assert _fields(lines[0])["tokens"] > 2 * SEQ_LEN  # several rows, the last one padded


def test_teacher_line_is_scored_the_same_way(student_dir, tiny_teacher, texts, capsys):
    path = texts[0]
    assert cli.main(["eval", str(student_dir), "--teacher", str(tiny_teacher), "--text", str(path),
                     "--seq-len", str(SEQ_LEN)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [_fields(line)["model"] for line in lines] == ["student", "teacher"] and err == ""
    teacher = score_text(load_causal_lm(tiny_teacher, "float32"), load_tokenizer(tiny_teacher), TEXT, SEQ_LEN)
    assert _fields(lines[1])["bits/byte"] == f"{teacher['bits_per_byte']:.3f}"
    assert _fields(lines[1])["tokens"] == _fields(lines[0])["tokens"] == teacher["tokens"]


def test_a_student_without_tokenizer_files_uses_the_teachers(tmp_path, tiny_teacher, texts, capsys):
    bare = save_student(convert_to_bitnet(load_causal_lm(tiny_teacher, "float32")), tmp_path / "bare")
    assert cli.main(["eval", str(bare), "--text", str(texts[1])]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert cli.main(["eval", str(bare), "--teacher", str(tiny_teacher), "--text", str(texts[1])]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("case", ["missing", "directory", "not_utf8", "empty", "plain_model", "no_student"])
def test_bad_input_is_one_error_line_and_exit_2(case, student_dir, tiny_teacher, tmp_path, capsys):
    student, text = str(student_dir), tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    if case == "missing":
        text = tmp_path / "nope.txt"
    elif case == "directory":
        text = tmp_path
    elif case == "not_utf8":
        text.write_bytes("café".encode("latin-1") + b" \xff\xfe")
    elif case == "empty":
        text.write_bytes(b"")
    elif case == "plain_model":
        student = str(tiny_teacher)
    else:
        student = str(tmp_path / "no-such-student")
    assert cli.main(["eval", student, "--text", str(text)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert (student if case in ("plain_model", "no_student") else str(text)) in err


def test_usage_errors_are_one_line_too(capsys):
    assert cli.main(["eval", "somewhere"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "--text" in err
    assert cli.main(["eval", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: distill eval STUDENT")


def test_help_lists_every_config_group_and_option_from_the_config_folders(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    groups = [p for p in config_dir().iterdir() if p.is_dir()]
    assert {"placement", "experiment", "teacher", "distillation"} <= {g.name for g in groups}
    for group in groups:
        assert f"{group.name}={{{','.join(sorted(o.stem for o in group.glob('*.yaml')))}}}" in out


def _task_file(tmp_path, answers=("yes", "no", "yes", "no")):
    import json

    (tmp_path / "test").mkdir()
    with open(tmp_path / "test" / "a.jsonl", "w") as out:
        for i, answer in enumerate(answers):
            out.write(json.dumps({"q": f"Is {i} even?", "a": answer}) + "\n")
    path = tmp_path / "parity.yaml"
    path.write_text(f"""
task:
  name: parity
  test: {{name: parity, kind: jsonl, path: {tmp_path / 'test'}, format: prompt_response, prompt_field: q,
         response_field: a, prompt_template: "Answer yes or no. {{prompt}}"}}
  labels: ["yes", "no"]  # quoted: YAML reads a bare yes as true
  metrics: [accuracy, label_accuracy, exact_match]
  max_new_tokens: 3
""")
    return path


def test_eval_scores_a_task_file_on_its_held_out_records_as_the_task_metrics_do(student_dir, tmp_path, capsys):
    from distillation.data.records import prompt_turns
    from distillation.tasks import Example
    from distillation.tasks.metrics import score_task

    assert cli.main(["eval", str(student_dir), "--task", str(_task_file(tmp_path)), "--records", "2"]) == 0
    out, err = capsys.readouterr()
    words = out.split()
    assert words[:3] == ["student", "task", "parity"] and words[-2:] == ["records", "2"] and err == ""
    examples = [Example(prompt_turns(f"Is {i} even?", "", "Answer yes or no. {prompt}")[:1], a)
                for i, a in ((0, "yes"), (2, "yes"))]  # 2 of 4 records, spread evenly
    want = score_task(load_student(student_dir), load_tokenizer(student_dir), examples,
                      ("accuracy", "label_accuracy", "exact_match"), chat=True, labels=("yes", "no"), max_new_tokens=3)
    assert dict(zip(words[3:-2:2], words[4:-2:2])) == {k: f"{want[k]:.3f}" for k in ("accuracy", "label_accuracy",
                                                                                   "exact_match")}


@pytest.mark.parametrize("args, message", [
    (["--task", "no_such_task"], "unknown option 'no_such_task' for config group 'task'"),
    ([], "nothing to score: give --text FILE ... and/or --task TASK"),
    (["--task", "LABELS"], "a.jsonl:1: the answer 'maybe' is not one of task.labels \\['yes', 'no'\\]"),
])
def test_a_bad_task_is_one_error_line_and_exit_2(student_dir, tmp_path, capsys, args, message):
    if args[1:] == ["LABELS"]:
        args = ["--task", str(_task_file(tmp_path, answers=("maybe", "no")))]
    assert cli.main(["eval", str(student_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err
