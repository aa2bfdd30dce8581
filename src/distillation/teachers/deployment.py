"""The teacher pool as a Ray Serve application: batching, autoscaling and resources come from config.

No HTTP ingress: the pool is reached through a DeploymentHandle (Ray Data's annotator holds one).
Every kind answers with `TeacherOutput` columns, so the data stage does not care which one runs.
Metrics (`ray.util.metrics`, visible in the dashboard and to Prometheus): request latency, tokens
scored, and requests in flight per replica.
"""

import asyncio
import time
from typing import List, Optional

import numpy as np
from omegaconf import DictConfig
from ray import serve
from ray.serve.handle import DeploymentHandle

from distillation.teachers.protocol import Teacher
from distillation.teachers.resolve import ResolvedTeacher

DEPLOYMENT_NAME = "Teacher"
LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]


def _build(kind: str, teacher_kwargs: dict, cache: Optional[dict]) -> Teacher:
    if kind == "hf":
        from distillation.teachers.hf import HFTeacher

        return HFTeacher(**teacher_kwargs)
    if kind == "vllm":
        from distillation.teachers.vllm import VLLMServerTeacher, VLLMTeacher

        return (VLLMServerTeacher if teacher_kwargs.get("vllm_url") else VLLMTeacher)(**teacher_kwargs)
    if kind == "cached":
        from distillation.teachers.cached import build_cached

        return build_cached(cache["dir"], cache["signature"], teacher_kwargs if cache["write_through"] else None,
                            cache["memory_mb"])
    raise ValueError(f"teacher kind '{kind}' has no deployment")


@serve.deployment(name=DEPLOYMENT_NAME)
class TeacherDeployment:
    def __init__(self, kind: str, teacher_kwargs: dict, num_threads: int, max_batch_size: int,
                 batch_wait_timeout_s: float, cache: Optional[dict] = None):
        import torch
        from ray.util import metrics

        torch.set_num_threads(num_threads)
        self.teacher = _build(kind, teacher_kwargs, cache)
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        tags = {"kind": kind}
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

    def __del__(self):  # Serve calls this on graceful replica shutdown: keep write-through answers
        if hasattr(self, "teacher"):  # absent when the constructor failed
            self.flush()
            self.teacher.close()  # a vLLM engine's process goes with the replica

    async def __call__(self, input_ids: np.ndarray, positions: Optional[np.ndarray] = None) -> dict:
        self.ongoing += 1
        self.in_flight.set(self.ongoing)
        try:
            return await self.score_batch(input_ids, positions)
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
            joined_positions = None if positions[0] is None else np.concatenate(positions)
            joined = await asyncio.to_thread(self.teacher.score, np.concatenate(requests), joined_positions)
            parts = joined.split([r.shape[0] for r in requests])
        else:
            parts = [await asyncio.to_thread(self.teacher.score, r, p) for r, p in zip(requests, positions)]
        self.latency.observe(time.perf_counter() - start)
        self.tokens.inc(sum(r.size for r in requests))
        return [part.to_columns() for part in parts]


def hf_teacher_kwargs(cfg: DictConfig, teacher: ResolvedTeacher) -> dict:
    t = cfg.teacher
    return dict(model_dir=teacher.ref,  # resolved on the replica's node
                top_k=t.top_k, temperature=cfg.distillation.temperature,
                qkv_layer=teacher.qkv_layer, dtype=t.dtype, max_tokens_per_batch=t.max_tokens_per_batch,
                trust_remote_code=t.trust_remote_code, vocab_size=teacher.vocab_size, signal=t.signal, draws=t.draws,
                device="cuda" if t.num_gpus > 0 else "cpu")


def teacher_app(cfg: DictConfig, teacher: ResolvedTeacher):
    t = cfg.teacher
    scaling = ({"num_replicas": t.min_replicas} if t.min_replicas == t.max_replicas else
               {"autoscaling_config": {"min_replicas": t.min_replicas, "max_replicas": t.max_replicas,
                                       "target_ongoing_requests": t.target_ongoing_requests,
                                       "upscale_delay_s": t.upscale_delay_s, "downscale_delay_s": t.downscale_delay_s}})
    kwargs = hf_teacher_kwargs(cfg, teacher)
    if t.kind == "vllm":
        kwargs.update(max_model_len=t.max_model_len, kv_cache_gib=t.kv_cache_gib, vllm_url=t.vllm_url,
                      gpu_memory_utilization=t.gpu_memory_utilization, tensor_parallel_size=t.tensor_parallel_size)
    cache = None
    if t.kind == "cached":
        from distillation.teachers.resolve import cache_signature

        cache = {"dir": t.cache_dir, "write_through": t.write_through, "signature": cache_signature(cfg, teacher),
                 "memory_mb": t.cache_memory_mb}
    return TeacherDeployment.options(
        ray_actor_options={"num_cpus": t.num_cpus, "num_gpus": t.num_gpus, "resources": dict(t.resources)},
        max_ongoing_requests=max(4, 2 * t.max_batch_size), health_check_period_s=t.health_check_period_s,
        **scaling,
        logging_config={"log_level": "WARNING", "enable_access_log": False},  # one line per request otherwise
    ).bind(t.kind, kwargs, t.num_threads, t.max_batch_size, t.batch_wait_timeout_s, cache)


def deploy_teacher(cfg: DictConfig, teacher: ResolvedTeacher, app_name: str) -> DeploymentHandle:
    serve.start(proxy_location="Disabled")  # handles only; nothing listens on a port
    return serve.run(teacher_app(cfg, teacher), name=app_name, route_prefix=None)
