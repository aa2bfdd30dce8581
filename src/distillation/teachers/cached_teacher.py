"""The cached teacher: replays answers precomputed by `ray_jobs/precompute_teacher.py`.

With a live teacher attached (write-through), a miss is answered live and stored, so a second run
over the same data needs no teacher at all. Without one, a miss is an error naming how many
sequences were missing and where the cache is, never silently wrong targets.
"""

from typing import Optional

import numpy as np

from distillation.errors import DistillError
from distillation.teachers.cache_store import TeacherCache
from distillation.teachers.protocol import TeacherBase
from distillation.teachers.schema import TeacherOutput


class CachedTeacher(TeacherBase):
    def __init__(self, cache: TeacherCache, live=None):
        self.cache, self.live = cache, live
        self.hits = self.misses = 0

    @property
    def vocab_size(self) -> int:
        return self.cache.signature["vocab_size"]

    def describe(self) -> dict:
        return {"kind": "cached", "cached_sequences": len(self.cache), "write_through": self.live is not None,
                "signature": self.cache.signature["signature"], "hits": self.hits, "misses": self.misses,
                **{k: self.cache.signature[k] for k in ("signal", "top_k", "draws", "temperature", "qkv_layer",
                                                        "vocab_size")}}

    def score(self, input_ids: np.ndarray, positions: Optional[np.ndarray] = None) -> TeacherOutput:
        input_ids = np.asarray(input_ids)
        found, missing = self.cache.lookup(input_ids, positions)
        if missing:  # another replica (or the precompute job) may have written them since
            self.cache.reload()
            found, missing = self.cache.lookup(input_ids, positions)
        if not missing:
            self.hits += len(input_ids)
            return found
        if self.live is None:
            raise DistillError(f"{len(missing)} of {len(input_ids)} sequences are not in the teacher cache "
                               f"{self.cache.directory}; precompute them (with this run's data settings: sources, "
                               f"data.seq_len, data.pack_documents) or set teacher.write_through=true")
        self.misses += len(missing)
        self.hits += len(input_ids) - len(missing)
        missing_positions = None if positions is None else positions[missing]
        self.cache.add(input_ids[missing], self.live.score(input_ids[missing], missing_positions), missing_positions)
        found, still = self.cache.lookup(input_ids, positions)
        assert not still, "a write-through answer was not stored"
        return found

    def flush(self) -> None:
        self.cache.flush()


def build_cached(cache_dir: str, signature: dict, live_kwargs: Optional[dict], memory_mb: float) -> CachedTeacher:
    live = None
    if live_kwargs is not None:
        from distillation.teachers.hf import HFTeacher

        live = HFTeacher(**live_kwargs)
    return CachedTeacher(TeacherCache(cache_dir, signature, create=live is not None, memory_mb=memory_mb), live)
