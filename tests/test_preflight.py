"""Checks before a run starts: the run folder, its storage, teacher settings."""

import pytest

from conftest import tiny_overrides
from distillation.config import load_config
from distillation.errors import DistillError


def _run_folder(overrides):
    from distillation.config import to_yaml
    from distillation.preflight import run_folder

    cfg = load_config(overrides)
    return run_folder(cfg.run, to_yaml(cfg))


def test_an_output_folder_that_cannot_be_created_is_a_clear_error():
    with pytest.raises(DistillError, match="cannot create run folder /proc/distill-out/x"):
        _run_folder(["run.output_dir=/proc/distill-out", "run.name=x"])
    with pytest.raises(DistillError, match="holds no run"):
        _run_folder(["run.output_dir=/proc/distill-out", "run.name=x", "run.resume=true"])


@pytest.mark.parametrize("storage", ["/proc/distill-runs", "file:///proc/sys/distill"])
def test_an_unwritable_storage_path_stops_the_run_before_anything_is_written(storage, tiny_teacher, tmp_path, capsys):
    from distillation import cli

    args = tiny_overrides(tiny_teacher, tmp_path) + [f"run.storage_path={storage}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot create the run's storage (run.storage_path={storage}): /proc")
    assert len(err.splitlines()) == 1 and "is not writable" in err
    assert list(tmp_path.iterdir()) == []  # no run folder, no config.yaml


def test_a_vllm_engine_sharded_over_more_gpus_than_its_replica_books_is_refused():
    from distillation.preflight import check_teacher_kind
    from distillation.teachers.resolve import ResolvedTeacher

    cfg = load_config(["teacher=vllm", "distillation=logits_only", "teacher.tensor_parallel_size=2",
                       "teacher.num_gpus=1"])
    teacher = ResolvedTeacher(model_dir=None, ref=None, tokenizer=None, vocab_size=None, qkv_layer=None)
    with pytest.raises(DistillError, match="tensor_parallel_size=2 .* teacher.num_gpus=1; set them equal"):
        check_teacher_kind(cfg.teacher, cfg.distillation.temperature, cfg.data.seq_len, teacher)
    cfg = load_config(["teacher=vllm", "distillation=logits_only", "teacher.tensor_parallel_size=2", "teacher.num_gpus=2"])
    check_teacher_kind(cfg.teacher, cfg.distillation.temperature, cfg.data.seq_len, teacher)


def test_a_run_saved_before_a_setting_existed_resumes_with_that_setting_at_its_default(tmp_path):
    from distillation.config import to_yaml

    args = [f"run.output_dir={tmp_path}", "run.name=old"]
    saved = to_yaml(load_config(args))
    assert "pack_documents: false" in saved
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text(saved.replace("  pack_documents: false\n", ""))
    assert _run_folder(args + ["run.resume=true"]) == tmp_path / "old"
    with pytest.raises(DistillError, match="data.pack_documents"):
        _run_folder(args + ["run.resume=true", "data.pack_documents=true"])
