"""Role: the precompute command's Ray Data stages (precompute.py builds the pipeline): `UnitRows`
actors cut units into training rows as a run cuts them, and `ScoreAndStore` actors (one per
`teacher.max_replicas`, booking a replica's resources) score the rows not yet cached and write
them as atomic Parquet shards."""

from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import ray

from distillation.config.schema import TeacherConfig
from distillation.data.rows import RowRecipe
from distillation.data.sources import SourceSpec
from distillation.specs import ScorerSpec
from distillation.teachers.scorer import build_scorer


@dataclass(frozen=True)
class PrecomputeSpec:
    recipe: RowRecipe  # how units are cut into rows, as the run cuts them
    sources: Dict[str, SourceSpec]
    scorer: ScorerSpec  # a transformers teacher
    signature: dict  # what the cache's answers are computed with
    cache_dir: str
    reader_cpus: float
    batch_size: int  # rows per scoring call


class ScoreAndStore:
    """Scores the rows the cache lacks with a transformers teacher and stores the answers."""

    def __init__(self, scorer: ScorerSpec, num_threads: int, cache_dir: str, signature: dict):
        import torch

        from distillation.teachers.cache_store import TeacherCache

        torch.set_num_threads(num_threads)
        self.teacher = build_scorer(scorer)
        self.cache = TeacherCache(cache_dir, signature, create=True, flush_rows=1)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        from distillation.teachers.cache_store import row_keys

        ids = np.stack(batch["input_ids"])  # type: ignore[call-overload]  # np.stack iterates an ndarray; stubs want a Sequence
        positions = (np.stack(batch["positions"])  # type: ignore[call-overload]  # np.stack iterates an ndarray; stubs want a Sequence
                     if "positions" in batch else None)  # packed rows
        todo = [i for i, key in enumerate(row_keys(ids, positions)) if not self.cache.has(key)]
        if todo:  # flush_rows=1: one shard per batch, written at once
            todo_positions = None if positions is None else positions[todo]
            self.cache.add(ids[todo], self.teacher.score(ids[todo], todo_positions), todo_positions)
        return {"rows": np.array([len(ids)]), "scored": np.array([len(todo)])}


class UnitRows:
    """A unit's training rows, cut as the run cuts them."""

    def __init__(self, recipe: RowRecipe, specs: dict) -> None:
        self.recipe, self.specs = recipe, specs

    def __call__(self, item: dict) -> list:
        spec = self.specs[item["source"]]
        train = self.recipe.cut(spec, spec.units[int(item["unit"])])["train"]
        if train.positions is not None:
            return [{"input_ids": row, "positions": pos} for row, pos in zip(train.rows, train.positions)]
        return [{"input_ids": row} for row in train.rows]


def score_units(units: List[dict], spec: PrecomputeSpec, t: TeacherConfig) -> "ray.data.Dataset":
    """Every unit's rows through the cutting and scoring actors; each output row counts a batch's
    rows and how many of them were scored (the answers go to the cache)."""
    return ray.data.from_items(units).flat_map(
        UnitRows, fn_constructor_kwargs={"recipe": spec.recipe, "specs": spec.sources},
        num_cpus=spec.reader_cpus, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
    ).map_batches(
        ScoreAndStore, batch_size=spec.batch_size, num_cpus=t.num_cpus, num_gpus=t.num_gpus,
        compute=ray.data.ActorPoolStrategy(size=t.max_replicas),
        fn_constructor_kwargs={"scorer": spec.scorer, "num_threads": t.num_threads, "cache_dir": spec.cache_dir,
                               "signature": spec.signature})
