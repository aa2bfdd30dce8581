"""Role: a teacher replica, one process per replica of the Ray Serve application `teacher-<run>`
(deployment `Teacher`), started by the driver (run.py) and called by the training workers' Ray Data
stage (roles/annotate_stage.py). It accepts a `ReplicaSpec` (built in specs.py) and books
`replica_bundle(teacher)`; batching and autoscaling come from `teacher.*`.

No HTTP ingress: the pool is reached through a DeploymentHandle (Ray Data's annotator holds one).
Every kind answers with `TeacherOutput` columns, so the data stage does not care which one runs.
Metrics (`ray.util.metrics`, visible in the dashboard and to Prometheus): request latency, tokens
scored, and requests in flight per replica.
"""

import asyncio
import time
from typing import TYPE_CHECKING, Dict, List, Optional, cast

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from distillation.config.schema import TeacherConfig
from distillation.specs import ReplicaSpec

if TYPE_CHECKING:  # the annotate stage imports this module for DEPLOYMENT_NAME: no model code at import
    from distillation.teachers.protocol import Teacher

DEPLOYMENT_NAME = "Teacher"
LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]


def app_name(run_name: str) -> str:
    return f"teacher-{run_name}"


def replica_bundle(t: TeacherConfig) -> Dict[str, float]:
    """What one replica books: its deployment's options and the driver's placement check use this."""
    return {"CPU": t.num_cpus, "GPU": t.num_gpus, **t.resources}


@serve.deployment(name=DEPLOYMENT_NAME)
class TeacherDeployment:
    def __init__(self, spec: ReplicaSpec):
        import torch
        from ray.util import metrics

        torch.set_num_threads(spec.num_threads)
        from distillation.teachers.scorer import build_scorer

        self.teacher: Teacher = build_scorer(spec.scorer)
        self.score_batch.set_max_batch_size(spec.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        tags = {"kind": spec.scorer.kind}
        self.latency = metrics.Histogram("distill_teacher_latency_s", "seconds per scoring call",
                                         boundaries=LATENCY_BUCKETS_S, tag_keys=("kind",))
        self.tokens = metrics.Counter("distill_teacher_tokens", "tokens scored", tag_keys=("kind",))
        self.in_flight = metrics.Gauge("distill_teacher_requests_in_flight", "requests waiting or being scored",
                                       tag_keys=("kind",))
        for metric in (self.latency, self.tokens, self.in_flight):
            metric.set_default_tags(tags)
        self.ongoing = 0
        self.largest_batch = 0  # most requests one Serve batch joined (operators: is batching happening?)

    def describe(self) -> dict:
        return {**self.teacher.describe(), "largest_batch": self.largest_batch}

    def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`; raising marks the replica unhealthy and
        Serve replaces it (a dead vLLM engine or an unreachable vLLM server, for instance)."""
        self.teacher.check_health()

    def flush(self) -> None:
        self.teacher.flush()

    def __del__(self) -> None:  # Serve calls this on graceful replica shutdown: keep write-through answers
        if hasattr(self, "teacher"):  # absent when the constructor failed
            self.flush()
            self.teacher.close()  # a vLLM engine's process goes with the replica

    async def __call__(self, input_ids: np.ndarray, positions: Optional[np.ndarray] = None) -> dict:
        self.ongoing += 1
        self.in_flight.set(self.ongoing)
        try:
            return cast(dict, await self.score_batch(input_ids, positions))  # @serve.batch: one request's answer
        finally:
            self.ongoing -= 1
            self.in_flight.set(self.ongoing)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def score_batch(self, requests: List[np.ndarray], positions: List[Optional[np.ndarray]]) -> List[dict]:
        start = time.perf_counter()
        self.largest_batch = max(self.largest_batch, len(requests))
        # Requests of one length (and one row layout: packed or not) are scored in one call; the scorer
        # itself keeps to the token budget.
        if len({(r.shape[1], p is None) for r, p in zip(requests, positions)}) == 1:
            joined_positions = None if positions[0] is None else np.concatenate(
                [p for p in positions if p is not None])  # all of them: one row layout
            joined = await asyncio.to_thread(self.teacher.score, np.concatenate(requests), joined_positions)
            parts = joined.split([r.shape[0] for r in requests])
        else:
            parts = [await asyncio.to_thread(self.teacher.score, r, p) for r, p in zip(requests, positions)]
        self.latency.observe(time.perf_counter() - start)
        self.tokens.inc(sum(r.size for r in requests))
        return [part.to_columns() for part in parts]


def teacher_app(spec: ReplicaSpec, t: TeacherConfig) -> "serve.Application":
    """The Serve application: `spec` for every replica; resources, replicas and autoscaling from `t`."""
    scaling = ({"num_replicas": t.min_replicas} if t.min_replicas == t.max_replicas else
               {"autoscaling_config": {"min_replicas": t.min_replicas, "max_replicas": t.max_replicas,
                                       "target_ongoing_requests": t.target_ongoing_requests,
                                       "upscale_delay_s": t.upscale_delay_s, "downscale_delay_s": t.downscale_delay_s}})
    bundle = replica_bundle(t)
    actor = {"num_cpus": bundle.pop("CPU"), "num_gpus": bundle.pop("GPU"), "resources": bundle}
    if "autoscaling_config" in scaling:
        # Replicas count their own running requests. By default each handle does and pushes them
        # to the controller; on Ray 2.60 one failed push (ObjectUnknownOwner) stops that handle's
        # pushes for good, the controller then sees 0 and the pool never scales out again (CI saw
        # it). The replica's count cannot go stale that way, and Ray plans it as the default.
        actor["runtime_env"] = {"env_vars": {"RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0"}}
    return TeacherDeployment.options(  # type: ignore[attr-defined]  # @serve.deployment: a Deployment
        ray_actor_options=actor,
        max_ongoing_requests=max(4, 2 * t.max_batch_size), health_check_period_s=t.health_check_period_s,
        **scaling,
        logging_config={"log_level": "WARNING", "enable_access_log": False},  # one line per request otherwise
    ).bind(spec)


def deploy_teacher(spec: ReplicaSpec, t: TeacherConfig, name: str) -> DeploymentHandle:
    serve.start(proxy_location="Disabled")  # handles only; nothing listens on a port
    return serve.run(teacher_app(spec, t), name=name, route_prefix=None)
