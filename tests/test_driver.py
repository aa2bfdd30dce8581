"""The driver as a user meets it (real runs, tiny models): a quiet terminal, Ctrl-C that stops after
the step with a checkpoint and says how to resume, a resumed run that may train longer and scores
the checkpoint it resumed from, a resume whose settings or source text changed refused, a broken
teacher stopped before training, and a bad record met in training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import in_background, tiny_model_dir, tiny_overrides, wait_for
from distillation.config import load_config

pytestmark = pytest.mark.slow
RAY_NOISE = (" INFO ", "core_worker", "(RayTrainWorker", "(TrainController", "(ServeReplica", "(MapWorker")


def _start(args, out: Path, **popen):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own, as a first run
    return subprocess.Popen([sys.executable, "-m", "distillation.cli", *args, "run.progress=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out, env=env, **popen)


def _wait_for_steps(run_dir: Path, process, steps: int, timeout: float = 600):  # a loaded machine is slow
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        time.sleep(0.5)
    process.kill()
    raise AssertionError(f"no {steps} steps within {timeout} s: {process.communicate()}")


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_says_how_to_resume(tiny_teacher, tmp_path):
    """Ctrl-C in a terminal (SIGINT to the whole foreground process group: the cluster's processes
    must ignore it) stops the run after the step; the resumed run then gets `kill -INT <driver>`, as
    a process supervisor sends, which the driver alone receives and acknowledges, and a second
    Ctrl-C, which stops it at once."""
    name = "interrupt"
    args = [o for o in tiny_overrides(tiny_teacher, tmp_path, steps=400) if not o.startswith("run.name")]
    process = _start(args + [f"run.name={name}"], tmp_path, start_new_session=True)
    run_dir = tmp_path / name
    _wait_for_steps(run_dir, process, 2)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted: stopped after step" in errors[0] and "run.resume=true" in errors[0]
    stopped = int(errors[0].split("stopped after step ")[1].split()[0])
    assert 2 <= stopped < 400
    assert list((run_dir / "ray" / "train").glob("checkpoint_*")), "no checkpoint was kept"
    terminal = stdout + stderr
    assert not [line for line in terminal.splitlines() if any(n in line for n in RAY_NOISE)], terminal[-3000:]
    assert "[distill] interrupt: stopping after the current step" in stdout

    # The run continues from that checkpoint (a resume that finishes, with a new length, is
    # test_resume_trains_longer_...'s); `kill -INT` and a Ctrl-C in quick succession then stop it at once.
    resumed = _start(args + [f"run.name={name}", "run.resume=true"], tmp_path, start_new_session=True)
    _wait_for_steps(run_dir, resumed, stopped + 1)
    said: list = []
    reader = in_background(lambda: said.extend(resumed.stdout))  # the driver's lines, as they come
    os.kill(resumed.pid, signal.SIGINT)  # the driver alone
    # Two signals that reach a blocked driver before Python runs its handler count once (CPython
    # coalesces them): the second is sent once the first is acknowledged, well within the step.
    wait_for(lambda: any("interrupt: stopping after the current step" in line for line in said), 60,
             "the first Ctrl-C to be acknowledged")
    os.killpg(resumed.pid, signal.SIGINT)
    resumed.wait(timeout=120)
    reader.join(timeout=10)
    stdout, stderr = "".join(said), resumed.stderr.read()
    assert resumed.returncode == 130, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: interrupted twice: stopped at once; the last checkpoint written, if any, is kept "
        "(run.resume=true continues from it)"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[:stopped] == list(range(1, stopped + 1)) and steps[stopped] == stopped + 1  # it went on from there
    terminal = stdout + stderr  # Ray's snapshot notice ("... delete the existing folder") stays in the logs
    assert "delete the existing folder" not in terminal and "PYTHON worker processes" not in terminal, terminal[-3000:]
    assert not [line for line in terminal.splitlines() if any(n in line for n in RAY_NOISE)], terminal[-3000:]


def test_resume_trains_longer_scores_the_checkpoint_it_resumed_from_and_refuses_changed_settings_or_text(
        tiny_teacher, ray_cluster, tmp_path):
    """One run resumed three times: with another learning rate (refused), longer (trained on, from a
    shared storage folder, scored from the checkpoint it resumed from), and after one of its source
    files was edited (refused, naming the file, the checkpoints untouched)."""
    from distillation.errors import DistillError
    from distillation.run import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(400)]
    for part in range(4):
        (corpus / f"part{part}.txt").write_text("\n".join(lines[part * 100:(part + 1) * 100]))
    args = [o for o in tiny_overrides(tiny_teacher, tmp_path, steps=2) if not o.startswith("run.name")] + [
        "run.name=longer", "distillation=logits_only", f"run.storage_path={tmp_path / 'shared'}",  # a shared folder
        f"data.sources=[{{name: mine, kind: text, path: {corpus}}}]"]
    first = run(load_config(args))
    with pytest.raises(DistillError, match="settings that differ .*: training.lr; a resumed run may change only"):
        run(load_config(args + ["run.resume=true", "training.lr=0.5"]))
    longer = run(load_config(args + ["run.resume=true", "training.max_steps=4"]))
    assert (first["steps"], longer["steps"], longer["resumed_from_step"]) == (2, 4, 2)
    assert longer["heldout"]["student_before"] == pytest.approx(first["heldout"]["student_after"])
    checkpoints = sorted((tmp_path / "shared" / "longer" / "train").glob("checkpoint_*"))
    assert checkpoints and (tmp_path / "shared" / "longer" / "student" / "config.json").is_file()

    before = {p: p.read_bytes() for c in checkpoints for p in c.rglob("*") if p.is_file()}
    edited = (corpus / "part2.txt").read_text().replace("lazy dog", "lazy cat")  # the same rows, other text
    (corpus / "part2.txt").write_text(edited)
    with pytest.raises(DistillError, match=rf"the files of source 'mine' \(fingerprint \w+ -> \w+: {corpus / 'part2.txt'}\) "
                                           r"changed since the checkpoint \(its files' names, sizes or modification times; "
                                           r".*\); resume with"):
        run(load_config(args + ["run.resume=true", "training.max_steps=6"]))
    assert {p: p.read_bytes() for c in checkpoints for p in c.rglob("*") if p.is_file()} == before


def test_a_teacher_with_nan_weights_is_stopped_before_training(tiny_teacher, smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "nan-teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_teacher / name).read_bytes())
    student = tiny_model_dir(tmp_path, 49152, seed=3, smollm2=smollm2_dir)
    out = tmp_path / "outputs"
    args = [o for o in tiny_overrides(broken, out) if not o.startswith("run.name")]
    done = subprocess.run([sys.executable, "-m", "distillation.cli", *args, f"student.init_from={student}",
                           "run.name=nan"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "scores a non-finite held-out loss" in errors[0] and "nothing was trained" in errors[0]
    assert not (out / "nan").exists()


def test_a_bad_record_met_in_training_stops_the_run_at_once_with_its_file_and_line(tiny_teacher, ray_cluster,
                                                                                  tmp_path):
    """A reference run's ledger says which unit training first reads at a later step; the same run on a
    corpus where that unit's file holds a bad line stops before the step that needs the unit (the data
    stage draws a few steps ahead, so it meets the record early), with one line and exit 2. The unit lies
    past the SCAN_UNITS the held-out scan may read, so training, not the scan, meets it."""
    import json

    from conftest import jsonl_corpus
    from distillation.data.corpus import SCAN_UNITS
    from distillation.data.sources import open_source
    from distillation.run import run

    corpus = jsonl_corpus(tmp_path / "corpus", files=SCAN_UNITS + 36, docs_per_file=2)
    args = [o for o in tiny_overrides(tiny_teacher, tmp_path, steps=12) if not o.startswith("run.name")] + [
        "distillation=ce_only", f"data.sources=[{{name: mine, kind: jsonl, path: {corpus}}}]"]
    run(load_config(args + ["run.name=reference"]))  # how often it saves does not change what it samples
    args.append("training.checkpoint_every=1")
    ledger = [json.loads(line) for line in (tmp_path / "reference" / "ledger.jsonl").read_text().splitlines()]
    first_use = {}
    for entry in ledger:
        for sample in entry["samples"]:
            first_use.setdefault(sample[2], entry["step"])
    step, unit = min((s, u) for u, s in first_use.items() if s >= 3 and u >= SCAN_UNITS)

    path = open_source("mine", "jsonl", str(corpus), "unused").units[unit].path
    lines = open(path).read().splitlines()
    lines[1] = "{broken"
    open(path, "w").write("\n".join(lines) + "\n")

    done = subprocess.run([sys.executable, "-m", "distillation.cli", *args, "run.name=bad", "run.progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}:2: not valid JSON"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    stopped = int(errors[0].split("training stopped after step ")[1].split(",")[0])
    metrics = tmp_path / "bad" / "metrics.jsonl"  # none when the stage met the record before step 1 ended
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
    assert stopped < step and steps == list(range(1, stopped + 1)), (step, stopped, steps)  # never the step that needs it
    assert len(list((tmp_path / "bad" / "ray" / "train").glob("checkpoint_*"))) >= min(stopped, 1)
