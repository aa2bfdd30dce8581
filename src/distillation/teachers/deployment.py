"""The teacher pool as a Ray Serve application: batching, autoscaling and resources come from config.

No HTTP ingress: the pool is reached through a DeploymentHandle (Ray Data's annotator holds one).
"""

import asyncio
from typing import List

import numpy as np
from omegaconf import DictConfig
from ray import serve
from ray.serve.handle import DeploymentHandle

DEPLOYMENT_NAME = "Teacher"


@serve.deployment(name=DEPLOYMENT_NAME)
class TeacherDeployment:
    def __init__(self, teacher_kwargs: dict, num_threads: int, max_batch_size: int, batch_wait_timeout_s: float):
        import torch

        from distillation.teachers.hf import HFTeacher

        torch.set_num_threads(num_threads)
        self.teacher = HFTeacher(**teacher_kwargs)
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def describe(self) -> dict:
        return self.teacher.describe()

    async def __call__(self, input_ids: np.ndarray) -> dict:
        return await self.score_batch(input_ids)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def score_batch(self, requests: List[np.ndarray]) -> List[dict]:
        # Requests of one length are scored in one call; the scorer itself keeps to the token budget.
        lengths = {r.shape[1] for r in requests}
        if len(lengths) == 1:
            joined = await asyncio.to_thread(self.teacher.score, np.concatenate(requests))
            parts = joined.split([r.shape[0] for r in requests])
        else:
            parts = [await asyncio.to_thread(self.teacher.score, r) for r in requests]
        return [part.to_columns() for part in parts]


def teacher_app(cfg: DictConfig, model_dir: str, qkv_layer, vocab_size: int):
    t = cfg.teacher
    scaling = ({"num_replicas": t.min_replicas} if t.min_replicas == t.max_replicas else
               {"autoscaling_config": {"min_replicas": t.min_replicas, "max_replicas": t.max_replicas,
                                       "target_ongoing_requests": t.target_ongoing_requests}})
    kwargs = dict(model_dir=str(model_dir), top_k=t.top_k, temperature=cfg.distillation.temperature,
                  qkv_layer=qkv_layer, dtype=t.dtype, max_tokens_per_batch=t.max_tokens_per_batch,
                  trust_remote_code=t.trust_remote_code, vocab_size=vocab_size, device="cuda" if t.num_gpus > 0 else "cpu")
    return TeacherDeployment.options(
        ray_actor_options={"num_cpus": t.num_cpus, "num_gpus": t.num_gpus},
        max_ongoing_requests=max(4, 2 * t.max_batch_size), **scaling,
        logging_config={"log_level": "WARNING", "enable_access_log": False},  # one line per request otherwise
    ).bind(kwargs, t.num_threads, t.max_batch_size, t.batch_wait_timeout_s)


def deploy_teacher(cfg: DictConfig, model_dir: str, qkv_layer, vocab_size: int, app_name: str) -> DeploymentHandle:
    serve.start(proxy_location="Disabled")  # handles only; nothing listens on a port
    return serve.run(teacher_app(cfg, model_dir, qkv_layer, vocab_size), name=app_name, route_prefix=None)
