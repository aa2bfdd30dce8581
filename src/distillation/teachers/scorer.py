"""`ScorerSpec`: everything a process needs to build the run's teacher (a Serve replica, a precompute
actor), and `build_scorer`, which builds it there."""

from dataclasses import dataclass
from typing import Any, Dict, Optional

from distillation.models import ModelSource
from distillation.teachers.protocol import Teacher


@dataclass(frozen=True)
class CacheSpec:
    """A cached teacher: its shards, what their answers must have been computed with, and whether a
    miss is answered live and stored."""

    dir: str
    signature: Dict[str, Any]
    write_through: bool
    memory_mb: float


@dataclass(frozen=True)
class ScorerSpec:
    kind: str  # hf | vllm | cached
    model: ModelSource  # resolved on the process's own node
    top_k: int
    temperature: float  # tau, applied by sparse signals (the loss applies it to hidden states)
    qkv_layer: Optional[int]  # the layer whose Q/K/V it returns; None without attention distillation
    dtype: str
    max_tokens_per_batch: int
    trust_remote_code: bool
    vocab_size: int
    signal: str
    draws: int
    device: str
    max_model_len: int = 2048  # the vLLM engine's settings, from here on
    kv_cache_gib: int = 1
    vllm_url: Optional[str] = None
    gpu_memory_utilization: float = 0.8
    tensor_parallel_size: int = 1
    cache: Optional[CacheSpec] = None  # kind == "cached"


def hf_kwargs(spec: ScorerSpec) -> dict:
    """HFTeacher's arguments (also a cached teacher's live one)."""
    return dict(model_dir=spec.model, top_k=spec.top_k, temperature=spec.temperature, qkv_layer=spec.qkv_layer,
                dtype=spec.dtype, max_tokens_per_batch=spec.max_tokens_per_batch,
                trust_remote_code=spec.trust_remote_code, device=spec.device, vocab_size=spec.vocab_size,
                signal=spec.signal, draws=spec.draws)


def build_scorer(spec: ScorerSpec) -> Teacher:
    if spec.kind == "hf":
        from distillation.teachers.hf import HFTeacher

        return HFTeacher(**hf_kwargs(spec))
    if spec.kind == "vllm":
        from distillation.teachers.vllm import VLLMServerTeacher, VLLMTeacher

        if spec.vllm_url:
            return VLLMServerTeacher(spec.vllm_url, spec.top_k, spec.temperature, vocab_size=spec.vocab_size,
                                     qkv_layer=spec.qkv_layer, signal=spec.signal)
        return VLLMTeacher(spec.model, spec.top_k, spec.temperature, vocab_size=spec.vocab_size, dtype=spec.dtype,
                           max_model_len=spec.max_model_len, kv_cache_gib=spec.kv_cache_gib,
                           trust_remote_code=spec.trust_remote_code, qkv_layer=spec.qkv_layer, signal=spec.signal,
                           max_tokens_per_batch=spec.max_tokens_per_batch,
                           gpu_memory_utilization=spec.gpu_memory_utilization,
                           tensor_parallel_size=spec.tensor_parallel_size, device=spec.device)
    if spec.kind == "cached" and spec.cache is not None:
        from distillation.teachers.cached_teacher import build_cached

        c = spec.cache
        return build_cached(c.dir, c.signature, hf_kwargs(spec) if c.write_through else None, c.memory_mb)
    raise ValueError(f"teacher kind '{spec.kind}' has no scorer")
