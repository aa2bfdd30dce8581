"""FSDP2 sharding of the student (training/parallel.py) on two real gloo processes, against one
unsharded copy trained on both ranks' rows (two micro-batches per step): the same updates, the same whole weights and optimizer
state in the checkpoint's index-keyed format, a restored optimizer that continues identically, and
influence scores summed over the shards equal to the unsharded scores."""

import copy

import pytest
import torch
import torch.distributed as dist

from conftest import spawn_gloo_ranks, tiny_optimizer, tiny_student

WORLD = 2


def _rows(rank: int, step: int, micro: int):
    generator = torch.Generator().manual_seed(100 * step + 10 * rank + micro)
    return torch.randint(0, 97, (2, 12), generator=generator), torch.tensor([12, 9])


def _loss(model, ids, lengths):
    from distillation.data.packing import next_token_labels
    from distillation.losses import IGNORE_INDEX

    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), next_token_labels(ids, lengths).flatten(),
                                             ignore_index=IGNORE_INDEX)


def _train(sharded, optimizer, scheduler, reference, ref_optimizer, ref_scheduler, rank, steps, first=0):
    """Two micro-batches per step on each rank; the reference takes all four (mean over the world)."""
    from distillation.training.parallel import gradient_sync

    for step in range(first, first + steps):
        for micro in range(2):
            with gradient_sync(sharded, sync=micro == 1):
                (_loss(sharded, *_rows(rank, step, micro)) / 2).backward()
            for r in range(WORLD):
                (_loss(reference, *_rows(r, step, micro)) / (2 * WORLD)).backward()
        norms = []
        for model, opt, sched in ((sharded, optimizer, scheduler), (reference, ref_optimizer, ref_scheduler)):
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        assert norms[0] == pytest.approx(norms[1], rel=1e-5)  # the norm over all shards, as clipping needs


def _same_optimizer_state(got: dict, want: dict):
    assert got["state"].keys() == want["state"].keys()
    for index, entry in want["state"].items():
        assert got["state"][index].keys() == entry.keys(), index
        for key, value in entry.items():
            torch.testing.assert_close(torch.as_tensor(got["state"][index][key]).float(),
                                       torch.as_tensor(value).float(), rtol=1e-4, atol=1e-6)
    assert got["param_groups"] == want["param_groups"]


def _worker(rank: int):
    from distillation.errors import DistillError
    from distillation.training.influence import alignment_scores
    from distillation.training.parallel import (
        distribute,
        is_sharded,
        load_optimizer_state,
        optimizer_state,
        whole_student_state,
    )

    reference = tiny_student()
    ref_optimizer, ref_scheduler = tiny_optimizer(reference)
    sharded = distribute(copy.deepcopy(reference), "fsdp", torch.device("cpu"))
    assert is_sharded(sharded) and sum(is_sharded(m) for m in sharded.modules()) == 3  # two layers and the root
    optimizer, scheduler = tiny_optimizer(sharded)
    _train(sharded, optimizer, scheduler, reference, ref_optimizer, ref_scheduler, rank, steps=3)

    whole = whole_student_state(sharded)
    saved = optimizer_state(sharded, optimizer)
    if rank == 0:
        want = reference.state_dict()
        assert whole.keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(whole[name], value, rtol=1e-4, atol=1e-6, msg=name)
        _same_optimizer_state(saved, ref_optimizer.state_dict())
    else:
        assert whole == {} and saved == {}

    # Scores from the shards, all-reduced, equal the whole student's.
    probe, batches = _rows(0, 50, 0), {"a": _rows(0, 51, 0), "b": _rows(1, 52, 0)}
    got, want = alignment_scores(sharded, probe, batches), alignment_scores(reference, probe, batches)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert all(p.grad is None for p in sharded.parameters())  # influence leaves no gradient behind

    # A fresh sharded student and optimizer, restored from the whole state, continue as the reference.
    saved = [saved]
    dist.broadcast_object_list(saved, src=0)
    restarted = distribute(copy.deepcopy(reference), "fsdp", torch.device("cpu"))
    restarted_optimizer, restarted_scheduler = tiny_optimizer(restarted)
    load_optimizer_state(restarted, restarted_optimizer, saved[0])
    restarted_scheduler.load_state_dict(ref_scheduler.state_dict())
    _train(restarted, restarted_optimizer, restarted_scheduler, reference, ref_optimizer, ref_scheduler,
           rank, steps=2, first=3)
    whole = whole_student_state(restarted)
    if rank == 0:
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(whole[name], value, rtol=1e-4, atol=1e-6, msg=name)

    # Ranks that built different students (say, a node whose hub copy moved on) are an error on
    # every rank before sharding: fully_shard, unlike DDP, does not broadcast rank 0's weights.
    different = tiny_student()
    if rank == 1:
        with torch.no_grad():
            next(different.parameters()).add_(1e-3)
    with pytest.raises(DistillError, match="training workers hold different students before sharding"):
        distribute(different, "fsdp", torch.device("cpu"))


def test_a_sharded_student_trains_saves_restores_and_scores_as_the_whole_one():
    spawn_gloo_ranks(_worker, world=WORLD)
