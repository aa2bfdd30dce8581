"""The teacher pool on a real local Ray cluster: it autoscales under load, and a killed replica
costs no batch."""

import threading

import numpy as np
import pytest
import ray
from ray import serve

from conftest import in_background, jsonl_mixture_inputs, save_tiny_llama, wait_for
from distillation.config import load_config
from distillation.data.mixture import MixturePlan
from distillation.models import pin_model
from distillation.roles.annotate_stage import worker_stream
from distillation.roles.mixture import Mixture
from distillation.roles.teacher_replica import DEPLOYMENT_NAME, deploy_teacher
from distillation.specs import FeedSpec, MixtureSpec, replica_spec
from distillation.teachers.resolve import ResolvedTeacher

pytestmark = pytest.mark.slow


def _deploy(cfg, teacher: ResolvedTeacher, name: str):
    return deploy_teacher(replica_spec(cfg, teacher), cfg.teacher, name)


def _pool_teacher(folder, vocab_size: int) -> ResolvedTeacher:
    return ResolvedTeacher(folder, pin_model(str(folder), "")[0], None, vocab_size, None)


def _running(app):
    status = serve.status().applications[app].deployments[DEPLOYMENT_NAME]
    return status.replica_states.get("RUNNING", 0)


def _cluster_state():
    return f"free: {ray.available_resources()}; replicas: {serve.status().applications}"


@pytest.fixture(scope="module")
def busy_teacher_dir(tmp_path_factory):
    """One layer, vocabulary 8192: ~75 ms per request of 2 x 512 tokens on one thread, so the replica
    and not Serve's routing is the bottleneck. With vocabulary 128 (6 ms) CI once saw the requests
    wait in the router of a busy driver while the replica idled (ongoing 0.85), so it never scaled out."""
    return save_tiny_llama(tmp_path_factory.mktemp("busy-teacher"), layers=1, vocab_size=8192)


def test_pool_scales_out_under_load_and_back_in(busy_teacher_dir, ray_cluster):
    cfg = load_config(["teacher.min_replicas=1", "teacher.max_replicas=2", "teacher.num_cpus=0.5",
                       "teacher.target_ongoing_requests=1", "teacher.upscale_delay_s=0.5",
                       "teacher.downscale_delay_s=2", "teacher.max_batch_size=1", "teacher.top_k=8"])
    handle = _deploy(cfg, _pool_teacher(busy_teacher_dir, 8192), "pool-autoscale")
    try:
        assert _running("pool-autoscale") == 1
        ids = np.random.default_rng(0).integers(0, 8192, (2, 512))
        stop, answered = threading.Event(), [0]

        def load():
            while not stop.is_set():
                [r.result() for r in [handle.remote(ids) for _ in range(8)]]
                answered[0] += 8

        workers = [in_background(load) for _ in range(2)]

        def details():  # say whether the load was really there
            return f"{_cluster_state()}; answered {answered[0]}; load errors {[w.errors for w in workers]}"

        # Generous: on two busy cores a new replica process needs a while to import torch and load.
        wait_for(lambda: _running("pool-autoscale") == 2, 240, "a second replica under load", 0.5, details)
        stop.set()
        for w in workers:
            w.join()
        assert not any(w.errors for w in workers), [w.errors for w in workers]
        wait_for(lambda: _running("pool-autoscale") == 1, 120, "scale back to one replica", 0.5, _cluster_state)
    finally:
        serve.delete("pool-autoscale")


def test_killed_replica_loses_no_batch(tiny_teacher, ray_cluster, tmp_path):
    cfg = load_config(["teacher.min_replicas=2", "teacher.max_replicas=2", "teacher.num_cpus=0.5",
                       "teacher.signal=topk", "teacher.top_k=8"])
    _deploy(cfg, _pool_teacher(tiny_teacher, 49152), "pool-kill")
    try:
        count = 48
        specs, recipe, pool = jsonl_mixture_inputs(tmp_path, tiny_teacher, names=("only",))
        plan = MixturePlan(["only"], [len(specs["only"].units)], [1.0], seed=0, samples_per_step=2, window=2)
        mixture = Mixture.options(name="pool-kill-mixture").remote(MixtureSpec(plan.state(), specs, recipe, pool, 2, 0.0))
        feed = FeedSpec("pool-kill-mixture", "pool-kill", teacher_batch_size=2, max_in_flight=4, max_attempts=6)
        dataset = worker_stream(np.arange(count), 2, feed)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "pool-kill" in a["name"] and a["namespace"] == "serve"]
        assert len(replicas) == 2, replicas
        seen = []
        for i, row in enumerate(dataset.iter_rows()):
            seen.append(int(row["sample_id"]))
            assert row["teacher_topk_ids"].shape == (64, 8)
            unit_rows = recipe.cut(specs["only"], specs["only"].units[row["unit"]])["train"].rows
            assert row["input_ids"].tolist() == unit_rows[row["row"]].tolist()
            if i == 4:  # mid-stream, with requests in flight
                ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=False)
        assert seen == list(range(count))  # every sample, once, in order
        now = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "pool-kill" in a["name"]]
        assert replicas[0]["name"] not in now  # the kill happened and Serve replaced the replica
    finally:
        serve.delete("pool-kill")
        ray.kill(mixture)


def test_a_serve_batch_gives_each_row_the_draws_it_gets_alone(tiny_dir_one_layer, ray_cluster):
    from distillation.teachers.hf import HFTeacher

    cfg = load_config(["teacher.num_cpus=0.5", "teacher.signal=sampled", "teacher.draws=12", "teacher.max_batch_size=4",
                       "teacher.batch_wait_timeout_s=2.0"])
    handle = _deploy(cfg, _pool_teacher(tiny_dir_one_layer, 128), "pool-batch")
    try:
        rows = np.random.default_rng(2).integers(0, 128, (4, 1, 64))
        answers = [r.result() for r in [handle.remote(row) for row in rows]]  # sent together: one batch
        assert handle.describe.remote().result()["largest_batch"] > 1
        alone = HFTeacher(tiny_dir_one_layer, top_k=cfg.teacher.top_k, temperature=cfg.distillation.temperature,
                          dtype=cfg.teacher.dtype, signal="sampled", draws=12)
        for row, answer in zip(rows, answers):
            expected = alone.score(row)
            np.testing.assert_array_equal(answer["teacher_sampled_ids"], expected.sampled_ids)
            np.testing.assert_array_equal(answer["teacher_sampled_weights"], expected.sampled_weights)
    finally:
        serve.delete("pool-batch")
