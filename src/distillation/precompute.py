"""Fill the teacher cache for a run's data: every training row of every source, so a cached teacher
answers whatever the mixture draws (its weights may move during the run).

A Ray Data pipeline streams the sources' units through the same reading and cutting the run uses
(data/corpus.py), then scores the rows not yet cached with transformers teachers (one actor per
`teacher.max_replicas`); each actor writes its answers as atomic Parquet shards, so a stopped
precompute keeps what it finished and a rerun only scores the rest. Nothing holds the corpus: rows
flow through in Ray Data blocks.
"""

import dataclasses

from distillation.config import Config
from distillation.errors import DistillError


def precompute(cfg: Config) -> dict:
    """The `precompute` command's driver: one pass over every unit, scoring what the cache lacks."""
    from distillation.cluster import init_ray
    from distillation.console import say
    from distillation.data.corpus import open_sources, row_recipe
    from distillation.roles.precompute_stages import PrecomputeSpec, score_units
    from distillation.specs import scorer_spec
    from distillation.teachers.cache_store import TeacherCache
    from distillation.teachers.resolve import cache_signature, resolve_teacher

    if not cfg.teacher.cache_dir:
        raise DistillError("missing required config value 'teacher.cache_dir' (where to write the cache)")
    teacher = resolve_teacher(cfg.teacher, cfg.student, cfg.distillation, cfg.data.cache_dir)
    specs = open_sources(cfg.data, cfg.task.labels)
    signature = cache_signature(cfg.teacher, cfg.distillation.temperature, teacher, cfg.data.cache_dir)
    cache = TeacherCache(cfg.teacher.cache_dir, signature, create=True)
    init_ray(cfg.run)
    units = [{"source": name, "unit": i} for name, spec in specs.items() for i in range(len(spec.units))]
    say(f"teacher cache {cache.directory}: {len(cache)} rows cached; scoring the training rows of "
        f"{len(units)} units")
    spec = PrecomputeSpec(row_recipe(cfg.data, teacher.ref), specs,
                          dataclasses.replace(scorer_spec(cfg, teacher), kind="hf", cache=None), signature,
                          cfg.teacher.cache_dir, cfg.data.reader_cpus, cfg.data.teacher_batch_size)
    ds = score_units(units, spec, cfg.teacher)
    planned = scored = 0
    for batch in ds.iter_batches(batch_size=None):  # counts only: the answers went to the cache
        planned += int(batch["rows"].sum())
        scored += int(batch["scored"].sum())
    cache.reload()  # the actors' shards
    summary = {"cache_dir": str(cache.directory), "planned": planned, "scored": scored, "cached": len(cache)}
    say(f"teacher cache ready: {summary}")
    return summary
