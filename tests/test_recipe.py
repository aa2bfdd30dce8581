"""The recipe's chaining, without running the stages (test_end_to_end runs them for real): which
stages run, resume or are skipped, and where each stage's student is handed on from, locally and
on shared storage."""

import json
from pathlib import Path

import pytest

from distillation.config import load_config
from distillation.errors import DistillError
from distillation.recipe import run_recipe

STAGES = ["recipe=bitdistill", "run.name=r", "run.progress=false", "student.quant_warmup_steps=10"]


def _finishing(durable: Path, ran: list):
    """A stage runner that records the stage's config and leaves what a finished run leaves in its
    durable folder (student/ and summary.json), so the next stage can be handed it."""
    def run_stage(cfg):
        ran.append(cfg)
        folder = durable / cfg.run.name
        (folder / "student").mkdir(parents=True)
        summary = {"steps": cfg.training.max_steps, "heldout": {"student_after": {"loss": 1.0}}}
        (folder / "summary.json").write_text(json.dumps(summary))
        return summary
    return run_stage


def test_a_stopped_stage_resumes_and_a_finished_one_is_skipped(tmp_path):
    cfg = load_config(STAGES + [f"run.output_dir={tmp_path}"])
    root = tmp_path / "r"
    (root / "teacher_sft" / "student").mkdir(parents=True)  # stage 0 finished
    (root / "teacher_sft" / "summary.json").write_text(json.dumps({"steps": 5, "heldout": {}}))
    (root / "pretrain").mkdir()
    (root / "pretrain" / "config.yaml").write_text("run: {}\n")  # stage 2 stopped before its student
    ran: list = []
    report = run_recipe(cfg, _finishing(root, ran))
    assert [(c.run.name, c.run.resume) for c in ran] == [("pretrain", True), ("distill", False)]
    assert ran[0].teacher.model == str(root / "teacher_sft" / "student")  # stage 0's teacher, not scored
    assert ran[1].teacher.model == str(root / "teacher_sft" / "student")
    assert ran[1].student.checkpoint_path == str(root / "pretrain" / "student")
    assert report["stages"]["teacher_sft"]["steps"] == 5
    assert json.loads((root / "recipe.json").read_text())["stages"] == report["stages"]


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_on_shared_storage_each_stage_hands_on_its_student_from_the_shared_folder(tmp_path, scheme):
    shared = tmp_path / "shared"
    cfg = load_config(STAGES + [f"run.output_dir={tmp_path / 'local'}", f"run.storage_path={scheme}{shared}"])
    ran: list = []
    report = run_recipe(cfg, _finishing(shared / "r", ran))
    assert [c.run.name for c in ran] == ["teacher_sft", "pretrain", "distill"]
    # the quantisation warm-up runs once, in the first stage that trains the converted student
    assert [c.student.quant_warmup_steps for c in ran] == [0, 10, 0]
    assert {c.run.storage_path for c in ran} == {str(shared / "r")}  # <storage>/<recipe>/<stage>/ per stage
    assert ran[2].teacher.model == str(shared / "r" / "teacher_sft" / "student")  # what every node reads
    assert ran[2].student.checkpoint_path == str(shared / "r" / "pretrain" / "student")
    assert json.loads((shared / "r" / "recipe.json").read_text())["stages"] == report["stages"]
    assert (tmp_path / "local" / "r" / "recipe.json").is_file()

    again: list = []  # a driver whose local folder is gone finds every stage done on the storage
    run_recipe(load_config(STAGES + [f"run.output_dir={tmp_path / 'elsewhere'}", f"run.storage_path={scheme}{shared}"]),
               _finishing(shared / "r", again))
    assert again == []


def test_an_object_store_is_refused_before_any_stage_runs(tmp_path):
    cfg = load_config(STAGES + [f"run.output_dir={tmp_path}", "run.storage_path=s3://bucket/runs"])
    with pytest.raises(DistillError, match=r"storage must be a shared file system path \(or file://\)"):
        run_recipe(cfg, lambda stage: pytest.fail("a stage ran"))
    assert not (tmp_path / "r").exists()
