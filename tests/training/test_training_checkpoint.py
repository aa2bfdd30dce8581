"""Full training checkpoints without Ray: they round-trip exactly and refuse corrupt files."""

import json
import shutil

import pytest
import torch

from conftest import tiny_optimizer, tiny_student
from distillation.errors import DistillError
from distillation.training.checkpoint import load_training_checkpoint, save_training_checkpoint, saved_optimizer_state


def _train_steps(model, optimizer, scheduler, n):
    for _ in range(n):
        ids = torch.randint(0, 97, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_checkpoint_round_trip_restores_model_optimizer_scheduler_and_rng_exactly():
    model = tiny_student()
    optimizer, scheduler = tiny_optimizer(model)
    _train_steps(model, optimizer, scheduler, 3)
    folder = save_training_checkpoint(model, optimizer.state_dict(), scheduler, "a: 1\n",
                                      {"step": 3, "data": {"count": 12}})
    expected_next = torch.rand(3)  # what the RNG gives right after the checkpoint

    torch.manual_seed(123)
    restored, state, tensors = load_training_checkpoint(folder)
    assert torch.equal(torch.rand(3), expected_next)
    optimizer2, scheduler2 = tiny_optimizer(restored)
    optimizer2.load_state_dict(saved_optimizer_state(state, tensors))
    scheduler2.load_state_dict(state["scheduler"])
    assert state["step"] == 3 and state["data"] == {"count": 12}
    assert scheduler2.last_epoch == scheduler.last_epoch and scheduler2.get_last_lr() == scheduler.get_last_lr()
    for p, q in zip(model.parameters(), restored.parameters()):
        a, b = optimizer.state[p], optimizer2.state[q]
        assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(p, q), name
    # Continuing both gives the same parameters: nothing that matters was left out.
    torch.manual_seed(7)
    _train_steps(model, optimizer, scheduler, 2)
    torch.manual_seed(7)
    _train_steps(restored, optimizer2, scheduler2, 2)
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)


def test_corrupt_or_truncated_checkpoints_are_clear_errors():
    model = tiny_student()
    optimizer, scheduler = tiny_optimizer(model)
    _train_steps(model, optimizer, scheduler, 1)
    folder = save_training_checkpoint(model, optimizer.state_dict(), scheduler, "{}\n", {"step": 1})
    blob = (folder / "optimizer.safetensors").read_bytes()
    (folder / "optimizer.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DistillError, match="incomplete or corrupt"):
        load_training_checkpoint(folder)
    (folder / "train_state.json").write_text('{"step": ')
    with pytest.raises(DistillError, match="cannot read train_state.json"):
        load_training_checkpoint(folder)
    weights = folder / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (folder / "train_state.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(DistillError, match="unreadable"):
        load_training_checkpoint(folder)
    shutil.rmtree(folder)  # the storage went away under the run: said as that
    with pytest.raises(DistillError, match="is gone: its storage location was deleted or unmounted"):
        load_training_checkpoint(folder)


@pytest.mark.parametrize("form", ["folder", "uri"])
def test_checkpoint_folders_ray_train_never_registered_are_removed_and_only_those(tmp_path, form):
    from distillation.training.checkpoint import remove_unregistered

    train = tmp_path / "train"
    for name in ("checkpoint_2026-12-04_10-00-00.1", "checkpoint_2026-12-04_10-00-05.2", "checkpoint_2026-12-04_10-00-09.3",
                 "other"):
        (train / name).mkdir(parents=True)
        (train / name / "file").write_text("x")
    location = str(train) if form == "folder" else f"file://{train}"
    assert remove_unregistered(location) == []  # no snapshot yet: nothing is known to be unregistered
    registered = ["checkpoint_2026-12-04_10-00-00.1", "checkpoint_2026-12-04_10-00-05.2"]
    (train / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {}} for n in registered]}))
    assert remove_unregistered(location) == ["checkpoint_2026-12-04_10-00-09.3"]  # written after the driver died
    assert sorted(p.name for p in train.iterdir() if p.is_dir()) == registered + ["other"]
