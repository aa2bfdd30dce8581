"""Finding models: built-in names, local folders, and hub names (downloaded once, or offline from
an earlier download), with a one-line error saying what was tried; a model pinned on the driver
resolves on another node to the same revision."""

import dataclasses

import pytest

from conftest import save_tiny_llama
from distillation.errors import DistillError
from distillation.models import ModelRef, local_dir, pin_model, resolve_model

OLD, NEW = "a" * 40, "b" * 40  # commit hashes


def _hub_cache(root, main: str, snapshots=(OLD,)):
    """huggingface_hub's cache layout under `root`: refs/main names the snapshot the hub served last."""
    repo = root / "hub" / "models--Org--Tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)
    return {rev: save_tiny_llama(repo / "snapshots" / rev, seed=i, vocab_size=64) for i, rev in enumerate(snapshots)}


def test_a_hub_name_that_cannot_be_fetched_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without a hub: fail fast, never wait
    with pytest.raises(DistillError, match="model 'Org/NoSuchModel' is not built in, not a local folder, and could "
                                           "not be fetched from the hub into .*hub") as caught:
        resolve_model("Org/NoSuchModel", str(tmp_path))
    assert "\n" not in str(caught.value)


def test_a_hub_model_downloaded_earlier_is_used_offline(tmp_path, monkeypatch):
    snapshot = _hub_cache(tmp_path, main=OLD)[OLD]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("Org/Tiny", str(tmp_path)) == snapshot


def test_a_missing_local_folder_is_not_mistaken_for_a_hub_name(tmp_path):
    with pytest.raises(DistillError, match="model path '/no/such/dir' does not exist"):
        resolve_model("/no/such/dir", str(tmp_path))


def test_a_hub_model_pinned_on_the_driver_resolves_to_the_same_revision_on_another_node(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    driver = _hub_cache(tmp_path / "driver", main=OLD)
    ref, folder = pin_model("Org/Tiny", str(tmp_path / "driver"))
    assert folder == driver[OLD] and ref == ModelRef("Org/Tiny", str(tmp_path / "driver"), OLD)
    # Another node's cache, where the hub has since moved main to a newer commit: the pinned one is loaded.
    node = _hub_cache(tmp_path / "node", main=NEW, snapshots=(OLD, NEW))
    assert local_dir(dataclasses.replace(ref, cache_dir=str(tmp_path / "node"))) == node[OLD]
    # A node that has only the newer commit and no hub says which revision it needed.
    _hub_cache(tmp_path / "bare", main=NEW, snapshots=(NEW,))
    with pytest.raises(DistillError, match=f"model 'Org/Tiny' at revision {OLD} is not built in"):
        local_dir(dataclasses.replace(ref, cache_dir=str(tmp_path / "bare")))


def test_local_folders_are_not_pinned_and_travel_as_absolute_paths(tmp_path, monkeypatch):
    folder = save_tiny_llama(tmp_path / "tiny", vocab_size=64)
    ref, resolved = pin_model(str(folder), str(tmp_path / "cache"))
    assert ref.revision is None and resolved == folder and local_dir(ref) == folder == local_dir(str(folder))
    # Given relative to the driver's directory, it still names that folder in a worker elsewhere
    # (a Ray worker's cwd is not the driver's; `models/tiny` there would look like a hub name).
    monkeypatch.chdir(tmp_path)
    ref, _ = pin_model("tiny", str(tmp_path / "cache"))
    monkeypatch.chdir("/")
    assert ref.name == str(folder.resolve()) and local_dir(ref) == folder.resolve()


def test_the_student_starts_from_the_revision_the_driver_pinned(tmp_path, monkeypatch):
    """`student.init_from` defaults to the teacher's name: workers build it from the driver's pin, not
    from whatever another node's cache now calls main."""
    import torch

    from distillation.config import load_config
    from distillation.models import resolve_model
    from distillation.specs import student_spec
    from distillation.student import build_student
    from distillation.teachers.resolve import student_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    driver = _hub_cache(tmp_path / "driver", main=OLD)
    cfg = load_config(["student.init_from=Org/Tiny", "student.num_layers=2", f"data.cache_dir={tmp_path / 'driver'}"])
    ref, folder = student_source(cfg.student, cfg.data.cache_dir)
    assert folder == driver[OLD] and ref.revision == OLD
    _hub_cache(tmp_path / "node", main=NEW, snapshots=(OLD, NEW))
    node_cfg = load_config(["student.init_from=Org/Tiny", "student.num_layers=2", f"data.cache_dir={tmp_path / 'node'}"])
    pinned = build_student(student_spec(node_cfg, dataclasses.replace(ref, cache_dir=str(tmp_path / "node"))))
    main_there = resolve_model(node_cfg.student.init_from, node_cfg.data.cache_dir)
    unpinned = build_student(student_spec(node_cfg, main_there))  # main on that node: the newer commit, other weights
    expected = build_student(student_spec(cfg, ref))
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(pinned.state_dict()[weight], expected.state_dict()[weight])
    assert not torch.equal(unpinned.state_dict()[weight], expected.state_dict()[weight])


def test_a_data_reader_needs_only_the_tokenizer_and_a_worker_still_gets_the_weights(tmp_path, monkeypatch):
    """A CPU reader node resolves the teacher without its weights (gigabytes it never loads); on a node
    holding only that tokenizer copy, a worker that needs the weights does not take it for complete."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _hub_cache(tmp_path, main=OLD)[OLD]
    for weights in snapshot.glob("*.safetensors"):
        weights.unlink()  # as a tokenizer-only download leaves it
    ref = ModelRef("Org/Tiny", str(tmp_path), OLD)
    assert local_dir(ref, weights=False) == snapshot
    with pytest.raises(DistillError, match=r"hub model 'Org/Tiny' has no config.json or no \*.safetensors weights"):
        local_dir(ref)  # offline here; with a hub it downloads the weights into the same snapshot
