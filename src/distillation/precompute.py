"""Fill the teacher cache for a run's data: every training row of every source, so a cached teacher
answers whatever the mixture draws (its weights may move during the run).

A Ray Data pipeline streams the sources' units through the same reading and cutting the run uses
(data/corpus.py), then scores the rows not yet cached with transformers teachers (one actor per
`teacher.max_replicas`); each actor writes its answers as atomic Parquet shards, so a stopped
precompute keeps what it finished and a rerun only scores the rest. Nothing holds the corpus: rows
flow through in Ray Data blocks.
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
        from distillation.teachers.cache import row_keys

        ids = np.stack(batch["input_ids"])
        positions = np.stack(batch["positions"]) if "positions" in batch else None  # packed rows
        todo = [i for i, key in enumerate(row_keys(ids, positions)) if not self.cache.has(key)]
        if todo:  # flush_rows=1: one shard per batch, written at once
            todo_positions = None if positions is None else positions[todo]
            self.cache.add(ids[todo], self.teacher.score(ids[todo], todo_positions), todo_positions)
        return {"rows": np.array([len(ids)]), "scored": np.array([len(todo)])}


class UnitRows:
    """A unit's training rows, cut as the run cuts them."""

    def __init__(self, recipe, specs: dict):
        self.recipe, self.specs = recipe, specs

    def __call__(self, item: dict) -> list:
        spec = self.specs[item["source"]]
        train = self.recipe.cut(spec, spec.units[int(item["unit"])])["train"]
        if train.positions is not None:
            return [{"input_ids": row, "positions": pos} for row, pos in zip(train.rows, train.positions)]
        return [{"input_ids": row} for row in train.rows]


def precompute(cfg: DictConfig) -> dict:
    from distillation.cluster import init_ray
    from distillation.console import say
    from distillation.data.corpus import open_sources, row_recipe
    from distillation.teachers.cache import TeacherCache
    from distillation.teachers.deployment import hf_teacher_kwargs
    from distillation.teachers.resolve import cache_signature, resolve_teacher

    if not cfg.teacher.cache_dir:
        raise DistillError("missing required config value 'teacher.cache_dir' (where to write the cache)")
    teacher = resolve_teacher(cfg)
    specs = open_sources(cfg)
    signature = cache_signature(cfg, teacher)
    cache = TeacherCache(cfg.teacher.cache_dir, signature, create=True)
    init_ray(cfg)
    units = [{"source": name, "unit": i} for name, spec in specs.items() for i in range(len(spec.units))]
    say(f"teacher cache {cache.directory}: {len(cache)} rows cached; scoring the training rows of "
        f"{len(units)} units")
    t = cfg.teacher
    ds = ray.data.from_items(units).flat_map(
        UnitRows, fn_constructor_kwargs={"recipe": row_recipe(cfg, teacher.ref), "specs": specs},
        num_cpus=cfg.data.reader_cpus, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
    ).map_batches(
        ScoreAndStore, batch_size=cfg.data.teacher_batch_size, num_cpus=t.num_cpus, num_gpus=t.num_gpus,
        compute=ray.data.ActorPoolStrategy(size=t.max_replicas),
        fn_constructor_kwargs={"teacher_kwargs": hf_teacher_kwargs(cfg, teacher), "num_threads": t.num_threads,
                               "cache_dir": t.cache_dir, "signature": signature})
    planned = scored = 0
    for batch in ds.iter_batches(batch_size=None):  # counts only: the answers went to the cache
        planned += int(batch["rows"].sum())
        scored += int(batch["scored"].sum())
    cache.reload()  # the actors' shards
    summary = {"cache_dir": str(cache.directory), "planned": planned, "scored": scored, "cached": len(cache)}
    say(f"teacher cache ready: {summary}")
    return summary
