"""`build_scorer`: the run's teacher built from its `ScorerSpec` (specs.py) in the process that
answers with it (a Serve replica, a precompute actor)."""

from distillation.specs import ScorerSpec
from distillation.teachers.protocol import Teacher


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
