"""Where checkpoints and the final student live: the local run folder by default, or `run.storage_path`
(a shared folder or a URI), through pyarrow's filesystems as Ray Train reads it."""

from pathlib import Path

import pytest

from distillation.config import load_config
from distillation.storage import exists, read_text, run_storage, train_location, train_storage, upload, write_text


def test_by_default_everything_stays_in_the_run_folder(tmp_path):
    cfg = load_config()
    assert train_storage(cfg.run.storage_path, tmp_path / "run") == (str(tmp_path / "run" / "ray"), "train")
    assert run_storage(cfg.run.storage_path, tmp_path / "run") is None


@pytest.mark.parametrize("form", ["folder", "uri"])
def test_a_storage_path_holds_the_run_under_its_name(tmp_path, form):
    shared = tmp_path / "shared"
    given = str(shared) if form == "folder" else f"file://{shared}"
    cfg = load_config([f"run.storage_path={given}"])
    run_dir = tmp_path / "local" / "myrun"
    assert train_location(cfg.run.storage_path, run_dir) == f"{given}/myrun/train"
    (run_dir / "student").mkdir(parents=True)
    (run_dir / "student" / "config.json").write_text("{}")
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "ray").mkdir()
    (run_dir / "ray" / "big").write_text("x")
    upload(run_dir, run_storage(cfg.run.storage_path, run_dir), skip=("ray",))
    assert (shared / "myrun" / "student" / "config.json").is_file() and (shared / "myrun" / "summary.json").is_file()
    assert not (shared / "myrun" / "ray").exists()
    write_text(run_storage(cfg.run.storage_path, run_dir) + "/config.yaml", "a: 1\n")
    assert read_text(run_storage(cfg.run.storage_path, run_dir) + "/config.yaml") == "a: 1\n"
    shared = run_storage(cfg.run.storage_path, run_dir)
    assert exists(shared + "/summary.json") and not exists(shared + "/nothing")
    assert read_text(run_storage(cfg.run.storage_path, run_dir) + "/nothing") is None


def test_a_relative_storage_folder_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage, name = train_storage(load_config(["run.storage_path=rel/store"]).run.storage_path, Path("x"))
    assert storage == f"{tmp_path}/rel/store/x" and name == "train"


def test_a_uri_query_stays_at_the_end_of_every_location(tmp_path):
    from distillation.storage import join

    cfg = load_config(["run.storage_path='s3://bucket/runs?region=eu-west-1&endpoint_override=localhost:9000'"])
    assert train_location(cfg.run.storage_path, tmp_path / "myrun") == (
        "s3://bucket/runs/myrun/train?region=eu-west-1&endpoint_override=localhost:9000")
    assert join(run_storage(cfg.run.storage_path, tmp_path / "myrun"), "config.yaml") == (
        "s3://bucket/runs/myrun/config.yaml?region=eu-west-1&endpoint_override=localhost:9000")
    assert join(f"file://{tmp_path}/", "a", "b") == f"file://{tmp_path}/a/b"  # no query, no trailing mark
    assert join(f"{tmp_path}/exp?1", "train") == f"{tmp_path}/exp?1/train"  # a folder name, not a query
