"""Two training workers (DDP over gloo, on this machine's two cores) against one: the same rows per
step, students that agree across ranks at every checkpoint (the run fails otherwise), influence
updates computed once for both, and exact resume after one of the two workers is killed. Two FSDP
workers against two DDP workers: the same training, evaluation, influence and checkpoint format."""

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import in_background, pids_titled, tiny_overrides, wait_for
from distillation.config import load_config
from distillation.training.metrics import read_jsonl

pytestmark = pytest.mark.slow
STEPS = 4
EVAL = ["training.eval_every=2"]


def _overrides(teacher, out, name, workers, influence=False):
    replaced = ("run.name", "training.batch_size", "training.grad_accum") + (
        ("data.max_tokens_per_source", "data.heldout_fraction") if influence else ())
    base = [o for o in tiny_overrides(teacher, out, steps=STEPS) if not o.startswith(replaced)]
    # Four samples per step either way: one worker takes 2 micro-batches of 2, two workers take 2 rows each.
    shape = ["training.batch_size=2", f"training.grad_accum={2 // workers}", f"training.num_workers={workers}",
             "training.cpus_per_worker=0.5", "teacher.num_cpus=0.5", "training.num_threads=1",
             "training.checkpoint_every=2", "training.max_failures=2"]
    mixing = ["data.max_tokens_per_source=60000", "data.heldout_fraction=0.1",
              "data.probe_fraction=0.2", "influence.enabled=true", "influence.update_interval=2",
              "influence.delay_steps=1", "influence.batch_size=2", "influence.probe_sequences=2",
              "influence.eta=20"] if influence else []
    return base + shape + mixing + [f"run.name={name}"]


def _rows_per_step(run_dir):
    """{step: sorted samples} over every rank's ledger entries."""
    steps = {}
    for entry in read_jsonl(run_dir / "ledger.jsonl"):
        steps.setdefault(entry["step"], []).extend(tuple(s) for s in entry["samples"])
    return {step: sorted(samples) for step, samples in steps.items()}


def _checkpoint_layout(run_dir: Path) -> dict:
    """{file: {tensor name: shape}} of the run's latest checkpoint, every safetensors file in it."""
    latest = max((run_dir / "ray" / "train").glob("checkpoint_*"))
    layout = {}
    for path in sorted(latest.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            layout[str(path.relative_to(latest))] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return layout


def _evals(run_dir: Path) -> list:
    return [{k: v for k, v in row.items() if k.startswith("eval_")} for row in read_jsonl(run_dir / "metrics.jsonl")]


@dataclass
class Reference:
    """The module's one 2-worker DDP run, as it ended (the sharded resume trains the same run on
    afterwards, so everything the other tests compare with is read here first)."""

    out: Path
    summary: dict
    rows: dict
    ranks: set
    evals: list
    layout: dict


@pytest.fixture(scope="module")
def two_ddp_workers(tiny_teacher, ray_cluster, tmp_path_factory):
    """Two DDP workers with influence on and in-loop evaluation: the reference one worker, a killed
    worker's run and FSDP's run must each reproduce."""
    from distillation.run import run

    out = tmp_path_factory.mktemp("ddp")
    summary = run(load_config(_overrides(tiny_teacher, out, "ddp", workers=2, influence=True) + EVAL))
    assert [(e["step"], e["computed_at"]) for e in summary["mixture"]] == [(0, None), (3, 2)]  # once for both
    run_dir = out / "ddp"
    return Reference(out, summary, _rows_per_step(run_dir), {e["rank"] for e in read_jsonl(run_dir / "ledger.jsonl")},
                     _evals(run_dir), _checkpoint_layout(run_dir))


def test_two_workers_train_the_rows_one_worker_trains_with_twice_the_micro_batches(tiny_teacher, two_ddp_workers,
                                                                                   tmp_path):
    from distillation.run import run

    two = two_ddp_workers
    one = run(load_config(_overrides(tiny_teacher, tmp_path, "one", workers=1, influence=True) + EVAL))
    assert one["steps"] == two.summary["steps"] == STEPS
    assert two.ranks == {0, 1}
    assert _rows_per_step(tmp_path / "one") == two.rows
    # DDP averages the two ranks' mean gradients, as accumulation averages the two micro-batches':
    # the same updates up to float rounding, so the same held-out loss and the same influence update.
    after = one["heldout"]["student_after"]["loss"]
    assert after == pytest.approx(two.summary["heldout"]["student_after"]["loss"], rel=1e-3)
    assert one["mixture"][1]["weights"] == pytest.approx(two.summary["mixture"][1]["weights"], rel=1e-3)


def test_a_killed_worker_of_two_resumes_with_the_same_rows_and_one_influence_update(tiny_teacher, two_ddp_workers,
                                                                                  tmp_path):
    from distillation.run import run

    run_dir, killed = tmp_path / "killed", []

    def kill_one():
        wait_for(lambda: (read_jsonl(run_dir / "metrics.jsonl") or [{"step": 0}])[-1]["step"] >= 3, 400, "step 3")
        pids = pids_titled("RayTrainWorker")
        assert len(pids) == 2, pids
        os.kill(pids[1], signal.SIGKILL)
        killed.append(pids[1])

    killer = in_background(kill_one)
    summary = run(load_config(_overrides(tiny_teacher, tmp_path, "killed", workers=2, influence=True) + EVAL))
    killer.join(timeout=5)
    assert killed and not killer.errors and summary["steps"] == STEPS
    assert _rows_per_step(run_dir) == two_ddp_workers.rows
    assert [(e["step"], e["computed_at"]) for e in summary["mixture"]] == [
        (e["step"], e["computed_at"]) for e in two_ddp_workers.summary["mixture"]]


def test_fsdp_workers_train_evaluate_and_score_influence_as_ddp_workers_and_save_the_same_checkpoint(
        tiny_teacher, two_ddp_workers, tmp_path):
    """Also with activation checkpointing, and with the logits whole (a sharded student's head is not
    fused into the loss): the same updates as the DDP reference, which recomputes nothing and fuses."""
    from distillation.run import run

    ddp = two_ddp_workers.summary
    fsdp = run(load_config(_overrides(tiny_teacher, tmp_path, "fsdp", workers=2, influence=True) + EVAL
                           + ["training.parallelism=fsdp", "training.activation_checkpointing=true"]))
    assert _rows_per_step(tmp_path / "fsdp") == two_ddp_workers.rows
    # Sharded updates equal whole ones up to float rounding: held-out losses, in-loop evaluation (every
    # rank takes part in the sharded forward) and the influence update (scores summed over the shards).
    after = fsdp["heldout"]["student_after"]["loss"]
    assert after == pytest.approx(ddp["heldout"]["student_after"]["loss"], rel=1e-3)
    assert after < fsdp["heldout"]["student_before"]["loss"]
    evals = _evals(tmp_path / "fsdp")
    assert sum(bool(e) for e in evals) == 2 and evals == [pytest.approx(e, rel=1e-3) for e in two_ddp_workers.evals]
    assert [(e["step"], e["computed_at"]) for e in fsdp["mixture"]] == [(0, None), (3, 2)]
    assert fsdp["mixture"][1]["weights"] == pytest.approx(ddp["mixture"][1]["weights"], rel=1e-3)
    assert fsdp["mixture"][1]["weights"] != pytest.approx(ddp["mixture"][0]["weights"], rel=1e-3)  # it moved
    # The checkpoint is whole, in the format a DDP run writes.
    assert _checkpoint_layout(tmp_path / "fsdp") == two_ddp_workers.layout


def test_a_ddp_run_resumes_sharded_and_trains_on(tiny_teacher, two_ddp_workers):
    """The module's DDP run, resumed under FSDP for as many steps again (last in the module: it
    changes that run's folder, which the tests above read only through the fixture's copy)."""
    from distillation.run import run

    out = two_ddp_workers.out
    longer = run(load_config(_overrides(tiny_teacher, out, "ddp", workers=2, influence=True) + EVAL
                             + ["training.parallelism=fsdp", "run.resume=true", f"training.max_steps={2 * STEPS}"]))
    assert longer["steps"] == 2 * STEPS and longer["resumed_from_step"] == STEPS
    assert sorted(_rows_per_step(out / "ddp")) == list(range(1, 2 * STEPS + 1))
    assert longer["heldout"]["student_after"]["loss"] < longer["heldout"]["student_before"]["loss"]
