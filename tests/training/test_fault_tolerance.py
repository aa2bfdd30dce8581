"""Exact resume and fault tolerance on a real local cluster: a driver killed and resumed, and a run
that loses a teacher replica (the pipeline retries on its replacement) and then its training worker
(Ray Train restarts it from the latest checkpoint), each end in a run whose sample ledger and
mixture-weight history equal an uninterrupted run's, and so does its loss at every step.
Influence-weighted sampling is on, so the weights move during every run, and the quantisation
warm-up lasts until step 4, so every restart lands inside it and must continue its schedule."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from conftest import in_background, pids_titled, tiny_overrides, wait_for
from distillation.config import load_config
from distillation.training.metrics import read_jsonl

pytestmark = pytest.mark.slow
STEPS = 6


def _overrides(teacher, out, name):
    base = [o for o in tiny_overrides(teacher, out, steps=STEPS) if not o.startswith(("run.name", "data.max_tokens",
                                                                                       "data.heldout_fraction"))]
    return base + [f"run.name={name}", "data.max_tokens_per_source=60000", "data.heldout_fraction=0.1",
                   "data.probe_fraction=0.2", "influence.enabled=true", "influence.update_interval=2",
                   "influence.delay_steps=1", "influence.batch_size=2", "influence.probe_sequences=2",
                   "influence.eta=20", "training.checkpoint_every=2", "training.max_failures=2",
                   f"student.quant_warmup_steps={STEPS - 2}"]  # every restart lands inside the warm-up


def _outcome(run_dir: Path):
    ledger = read_jsonl(run_dir / "ledger.jsonl")
    mixture = json.loads((run_dir / "mixture.json").read_text())
    losses = np.array([row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl")])
    return ([(e["step"], e["rank"], [tuple(s) for s in e["samples"]]) for e in ledger],
            [(e["step"], e["computed_at"]) for e in mixture], np.array([e["weights"] for e in mixture]), losses)


@pytest.fixture(scope="module")
def reference(tiny_teacher, ray_cluster, tmp_path_factory):
    from distillation.run import run

    out = tmp_path_factory.mktemp("reference")
    summary = run(load_config(_overrides(tiny_teacher, out, "whole")))
    outcome = _outcome(Path(summary["run_dir"]))
    ledger, schedule, weights, losses = outcome
    assert [e[0] for e in ledger] == list(range(1, STEPS + 1))
    assert schedule == [(0, None), (3, 2), (5, 4)]  # updates after steps 2 and 4, used one step later
    assert not np.allclose(weights[0], weights[-1])  # the weights really moved
    assert len(losses) == STEPS
    return outcome


def _assert_same_run(run_dir: Path, reference):
    """The uninterrupted run's ledger, weight history and, step by step, loss: a restart inside
    the quantisation warm-up continues its schedule exactly."""
    ledger, schedule, weights, losses = _outcome(run_dir)
    assert ledger == reference[0]
    assert schedule == reference[1]
    np.testing.assert_allclose(weights, reference[2], rtol=1e-6)
    np.testing.assert_allclose(losses, reference[3], rtol=1e-5)


def _last_step(run_dir: Path) -> int:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return rows[-1]["step"] if rows else 0


def test_killed_driver_resumes_from_its_storage_path_with_the_same_ledger(tiny_teacher, reference, tmp_path):
    from distillation.run import run

    overrides = _overrides(tiny_teacher, tmp_path, "driver")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "distillation.cli", *overrides], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = tmp_path / "driver"
    try:
        # Killed once Ray Train has registered the step-2 checkpoint (its snapshot file) and training went on.
        registered = run_dir / "ray" / "train" / "checkpoint_manager_snapshot.json"
        wait_for(lambda: (registered.is_file() and _last_step(run_dir) >= 3) or driver.poll() is not None, 400,
                  "a registered checkpoint and step 3 of the first driver")
        assert driver.poll() is None, "the first driver ended before it could be killed"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    summary = run(load_config(overrides + ["run.resume=true"]))
    assert summary["resumed_from_step"] in (2, 4) and summary["steps"] == STEPS  # the latest registered one
    _assert_same_run(run_dir, reference)
    for name in ("ledger.jsonl", "metrics.jsonl"):  # the rows logged past the checkpoint were dropped, not repeated
        steps = [json.loads(line)["step"] for line in (run_dir / name).read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1)), (name, steps)


def test_a_killed_teacher_replica_and_training_worker_lose_no_sample_and_resume_from_the_checkpoint(
        tiny_teacher, reference, tmp_path):
    """One run, two faults: a teacher replica killed at step 2 (the pipeline retries on its restarted
    replacement) and then the training worker killed (Ray Train restarts it from the latest
    checkpoint); the run still ends with the uninterrupted run's ledger and weights."""
    from distillation.run import run

    run_dir = tmp_path / "faults"
    killed = []

    def kill_replica_then_worker():
        wait_for(lambda: _last_step(run_dir) >= 2, 400, "step 2")
        replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == "serve" and "teacher-faults#" in a["name"])  # teacher-<run.name>
        ray.kill(ray.get_actor(replica["name"], namespace="serve"), no_restart=False)
        killed.append(replica["name"])
        wait_for(lambda: _last_step(run_dir) >= 3, 400, "step 3")
        # Ray titles a worker process after the actor it hosts (the test cluster runs no dashboard,
        # so the state API is not available here); only this test's cluster, which this process started.
        pids = pids_titled("RayTrainWorker")
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])

    killer = in_background(kill_replica_then_worker)
    summary = run(load_config(_overrides(tiny_teacher, tmp_path, "faults")))
    killer.join(timeout=5)
    assert len(killed) == 2 and not killer.errors and summary["steps"] == STEPS
    _assert_same_run(run_dir, reference)
