"""What the driver sends each Ray process: one typed, frozen message per boundary, built here from
the loaded configuration. Past the loader, only these builders and the driver's phases (run.py,
preflight.py, precompute.py) see the whole `Config`; every process gets the spec below it needs.

    training worker    WorkerSpec    roles/train_worker.py
    teacher replica    ReplicaSpec   roles/teacher_replica.py (its ScorerSpec, built by teachers/scorer.py)
    mixture actor      MixtureSpec   roles/mixture.py (its unit readers get a RowRecipe per unit)
    precompute stages  PrecomputeSpec roles/precompute_stages.py
    held-out task      StudentSpec and the model loaders, roles/heldout_task.py
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from distillation.config.loader import to_yaml
from distillation.config.schema import Config, DistillationConfig, InfluenceConfig, TrainingConfig
from distillation.data.steps import samples_per_step

if TYPE_CHECKING:  # named in annotations only: a process that unpickles a spec imports no model code for it
    from distillation.data.packing import Packed
    from distillation.data.rows import RowRecipe
    from distillation.data.sources import SourceSpec
    from distillation.models import ModelSource
    from distillation.tasks.probe import TaskProbe
    from distillation.teachers.resolve import ResolvedTeacher


@dataclass(frozen=True)
class QuantRamp:
    """The warm-up's mix at each optimizer step: a function of the step alone, so every worker, a
    restarted worker and a resumed run apply the same one."""

    steps: int = 0  # 0: no warm-up, mix 1 from the first step
    schedule: str = "linear"  # linear | sigmoid (a logistic of slope 10, rescaled to run 0 -> 1)

    def mix(self, done: int) -> float:
        """The mix for the step after `done` completed ones: 0 for the first, 1 from step steps + 1."""
        if done >= self.steps:
            return 1.0
        t = done / self.steps
        if self.schedule == "linear":
            return t
        ends = 1 / (1 + math.exp(5)), 1 / (1 + math.exp(-5))
        return (1 / (1 + math.exp(-10 * (t - 0.5))) - ends[0]) / (ends[1] - ends[0])


@dataclass(frozen=True)
class StudentSpec:
    """The starting student, built alike by every worker and the held-out task (student/build.py)."""

    checkpoint_path: Optional[str]  # a saved BitNet student; else stage 1 converts `init_from`
    init_from: Optional[ModelSource]  # the full-precision model, pinned by the driver (resolved on each node)
    subln: str
    num_layers: Optional[int]
    trust_remote_code: bool
    ternary: bool = True  # false: `init_from` trained as it is, in full precision (stage 0)
    ramp: QuantRamp = QuantRamp()  # gradual ternarisation (training workers apply it; student/bitnet.py)


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


@dataclass(frozen=True)
class FeedSpec:
    """A worker's data feed: its rows from the mixture, their teacher answers from the pool."""

    mixture: str  # the named Mixture actor
    app_name: Optional[str]  # the teacher's Serve application; None when the loss needs no teacher
    teacher_batch_size: int  # sequences per teacher request
    max_in_flight: int  # teacher requests awaiting an answer (backpressure)
    max_attempts: int  # per request, when a replica fails


@dataclass(frozen=True)
class WorkerSpec:
    """The one message from the driver to every training worker (Ray Train's `train_loop_config`)."""

    training: TrainingConfig
    distillation: DistillationConfig
    influence: InfluenceConfig
    student: StudentSpec
    compile: bool  # torch.compile the BitNet quantizers
    signal: str  # the teacher's signal (hidden: the worker applies the teacher's output head)
    trust_remote_code: bool
    sources: Tuple[str, ...]  # source names, in the mixture's order
    feed: FeedSpec
    board: Optional[str]  # the named metrics board (metrics, ledger, stop requests)
    teacher_model: ModelSource  # for the frozen output head of the hidden-state signal
    vocab_size: int  # the shared real vocabulary (vocab.check_vocab)
    probe: Packed  # influence probe rows
    config_yaml: str  # the run's configuration, written into every checkpoint
    eval: Dict[str, Packed] = field(default_factory=dict)  # held-out rows per source
    task: Optional[TaskProbe] = None  # scored with the held-out rows (training.eval_every)

    @property
    def rows_per_step(self) -> int:  # on one rank
        return samples_per_step(self.training.batch_size, self.training.grad_accum, 1)


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica of the teacher pool is built from."""

    scorer: ScorerSpec  # the teacher it answers with
    num_threads: int  # torch intra-op threads
    max_batch_size: int  # Serve-side batching of concurrent requests
    batch_wait_timeout_s: float


@dataclass(frozen=True)
class MixtureSpec:
    """What the run's Mixture actor starts from."""

    plan_state: dict  # MixturePlan.state(): a new plan's, or a checkpoint's on resume
    sources: Dict[str, SourceSpec]  # opened sources (their units)
    recipe: RowRecipe  # how its readers cut units into rows
    pool: Dict[str, Packed]  # training rows per source that influence estimates draw from
    readers: int  # unit reader actors it owns
    reader_cpus: float  # CPUs each books


def student_spec(cfg: Config, init_from: Optional[ModelSource]) -> StudentSpec:
    """`init_from`: the driver's pin of `student.init_from` (None for a saved student)."""
    s = cfg.student
    return StudentSpec(s.checkpoint_path, init_from, s.subln, s.num_layers, cfg.teacher.trust_remote_code, s.ternary,
                       QuantRamp(s.quant_warmup_steps, s.quant_warmup_schedule))


def scorer_spec(cfg: Config, teacher: ResolvedTeacher) -> ScorerSpec:
    from distillation.teachers.resolve import cache_signature

    t = cfg.teacher
    cache = None
    if t.kind == "cached" and t.cache_dir:
        cache = CacheSpec(t.cache_dir, cache_signature(t, cfg.distillation.temperature, teacher, cfg.data.cache_dir),
                          t.write_through, t.cache_memory_mb)
    return ScorerSpec(kind=t.kind, model=teacher.ref, top_k=t.top_k, temperature=cfg.distillation.temperature,
                      qkv_layer=teacher.qkv_layer, dtype=t.dtype, max_tokens_per_batch=t.max_tokens_per_batch,
                      trust_remote_code=t.trust_remote_code, vocab_size=teacher.vocab_size, signal=t.signal,
                      draws=t.draws, device="cuda" if t.num_gpus > 0 else "cpu", max_model_len=t.max_model_len,
                      kv_cache_gib=t.kv_cache_gib, vllm_url=t.vllm_url, gpu_memory_utilization=t.gpu_memory_utilization,
                      tensor_parallel_size=t.tensor_parallel_size, cache=cache)


def replica_spec(cfg: Config, teacher: ResolvedTeacher) -> ReplicaSpec:
    t = cfg.teacher
    return ReplicaSpec(scorer_spec(cfg, teacher), t.num_threads, t.max_batch_size, t.batch_wait_timeout_s)


def worker_spec(cfg: Config, teacher: ResolvedTeacher, mixture: str, board: Optional[str], app_name: Optional[str],
                probe: Packed, eval_rows: Dict[str, Packed], task: Optional[TaskProbe] = None) -> WorkerSpec:
    d = cfg.data
    return WorkerSpec(training=cfg.training, distillation=cfg.distillation, influence=cfg.influence,
                      student=student_spec(cfg, teacher.student_ref), compile=cfg.student.compile,
                      signal=cfg.teacher.signal, trust_remote_code=cfg.teacher.trust_remote_code,
                      sources=tuple(s.name for s in d.sources),
                      feed=FeedSpec(mixture, app_name, d.teacher_batch_size, d.teacher_max_in_flight,
                                    d.teacher_max_attempts),
                      board=board, teacher_model=teacher.ref, vocab_size=teacher.vocab_size, probe=probe,
                      config_yaml=to_yaml(cfg), eval=eval_rows, task=task)
