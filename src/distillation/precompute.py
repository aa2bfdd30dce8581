"""Fill the teacher cache for a run's data: every training row of every source, so a cached teacher
answers whatever the mixture draws (its weights may move during the run).

A Ray Data pipeline scores the sequences not yet cached with transformers teachers (one actor per
`teacher.max_replicas`) and each actor writes its answers as atomic Parquet shards, so a stopped
precompute keeps what it finished and a rerun only scores the rest.
"""

from typing import Dict

import numpy as np
import ray
from omegaconf import DictConfig

from distillation.errors import DistillError


class ScoreAndStore:
    def __init__(self, teacher_kwargs: dict, num_threads: int, cache_dir: str, signature: dict):
        import torch

        from distillation.teachers.cache import TeacherCache
        from distillation.teachers.hf import HFTeacher

        torch.set_num_threads(num_threads)
        self.teacher = HFTeacher(**teacher_kwargs)
        self.cache = TeacherCache(cache_dir, signature, create=True, flush_rows=1)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        ids = np.stack(batch["input_ids"])
        self.cache.add(ids, self.teacher.score(ids))  # flush_rows=1: one shard per batch, written at once
        return {"rows": np.array([len(ids)])}


def precompute(cfg: DictConfig) -> dict:
    from distillation.cluster import init_ray
    from distillation.console import say
    from distillation.data.corpus import load_sources, prepare_corpus
    from distillation.teachers.cache import TeacherCache, sequence_key
    from distillation.teachers.deployment import hf_teacher_kwargs
    from distillation.teachers.resolve import cache_signature, resolve_teacher

    if not cfg.teacher.cache_dir:
        raise DistillError("missing required config value 'teacher.cache_dir' (where to write the cache)")
    teacher = resolve_teacher(cfg)
    documents = load_sources(cfg)
    signature = cache_signature(cfg, teacher)
    cache = TeacherCache(cfg.teacher.cache_dir, signature, create=True)
    init_ray(cfg)
    corpus = prepare_corpus(cfg, str(teacher.model_dir), teacher.tokenizer, documents)
    planned = np.concatenate([packed.rows for packed in corpus.train.values()])
    todo, planned_keys = [], set()  # keys of this corpus's rows only, not of the whole cache
    for row in planned:
        key = sequence_key(row)
        if key not in planned_keys and not cache.has(key):
            todo.append(row)
        planned_keys.add(key)
    say(f"teacher cache {cache.directory}: {len(planned)} training rows, {len(cache)} cached, "
        f"{len(todo)} to score")
    scored = 0
    if todo:
        t = cfg.teacher
        ds = ray.data.from_items([{"input_ids": row} for row in todo]).map_batches(
            ScoreAndStore, batch_size=cfg.data.teacher_batch_size, num_cpus=t.num_cpus, num_gpus=t.num_gpus,
            compute=ray.data.ActorPoolStrategy(size=t.max_replicas),
            fn_constructor_kwargs={"teacher_kwargs": hf_teacher_kwargs(cfg, teacher), "num_threads": t.num_threads,
                                   "cache_dir": t.cache_dir, "signature": signature})
        scored = int(sum(r["rows"] for r in ds.take_all()))
    cache.reload()  # the actors' shards
    summary = {"cache_dir": str(cache.directory), "planned": len(planned), "scored": scored, "cached": len(cache)}
    say(f"teacher cache ready: {summary}")
    return summary
