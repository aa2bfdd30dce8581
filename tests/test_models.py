"""Finding models: built-in names, local folders, and hub names (downloaded once, or offline from
an earlier download), with a one-line error saying what was tried."""

import pytest

from conftest import save_tiny_llama
from distillation.errors import DistillError
from distillation.models import resolve_model


def test_a_hub_name_that_cannot_be_fetched_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without a hub: fail fast, never wait
    with pytest.raises(DistillError, match="model 'Org/NoSuchModel' is not built in, not a local folder, and could "
                                           "not be fetched from the hub into .*hub") as caught:
        resolve_model("Org/NoSuchModel", str(tmp_path))
    assert "\n" not in str(caught.value)


def test_a_hub_model_downloaded_earlier_is_used_offline(tmp_path, monkeypatch):
    # The layout huggingface_hub's cache keeps: refs/main names the snapshot holding the files.
    repo = tmp_path / "hub" / "models--Org--Tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = save_tiny_llama(repo / "snapshots" / "abc123", vocab_size=64)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("Org/Tiny", str(tmp_path)) == snapshot


def test_a_missing_local_folder_is_not_mistaken_for_a_hub_name(tmp_path):
    with pytest.raises(DistillError, match="model path '/no/such/dir' does not exist"):
        resolve_model("/no/such/dir", str(tmp_path))
