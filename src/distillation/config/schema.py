"""Typed configuration schema: the one home of every default. YAML under `configs/` holds only what
an option changes; unknown keys, wrong types, values outside `one_of(...)` and non-positive
`positive(...)` values fail with one line (config/loader.py)."""

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, TypeVar

from omegaconf import MISSING

_T = TypeVar("_T")


def one_of(default: str, *others: str) -> str:
    """A string field that takes only these values (the first is the default)."""
    return field(default=default, metadata={"choices": (default, *others)})


def choices(config_class: type, name: str) -> Tuple[str, ...]:
    """The values `one_of` allows for a field, for code that checks them outside the config loader."""
    allowed: Tuple[str, ...] = next(f.metadata["choices"] for f in fields(config_class) if f.name == name)
    return allowed


def positive(default: _T) -> _T:
    """A number field that must be > 0."""
    return field(default=default, metadata={"positive": True})


class Frozen:
    """Frozen once the loader has validated it (`freeze`): every later assignment raises. Not
    `@dataclass(frozen=True)`: Hydra composes into the schema's nodes, which that makes read-only."""

    _frozen = False

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise dataclasses.FrozenInstanceError(f"cannot assign to '{name}': the configuration is frozen once loaded")
        super().__setattr__(name, value)


def freeze(node: _T) -> _T:
    """`node` and every section and list item under it, frozen in place; returns `node`."""
    if isinstance(node, Frozen):
        for f in fields(node):  # type: ignore[arg-type]  # every Frozen subclass is a dataclass
            freeze(getattr(node, f.name))
        object.__setattr__(node, "_frozen", True)
    elif isinstance(node, list):
        for item in node:
            freeze(item)
    return node


@dataclass
class TeacherConfig(Frozen):
    kind: str = one_of("hf", "vllm", "cached")  # transformers on Ray Serve | vLLM | replayed answers
    model: str = "smollm2-135m-instruct"  # built-in name (distillation.assets), local folder, or hub name (Org/Model)
    dtype: str = one_of("bfloat16", "float32", "float16")  # compute dtype of the teacher forward; outputs are fp16/fp32 regardless
    # hidden: the teacher's final hidden state; workers apply its output head (exact KL, hidden_size * 2 B/token)
    # | sampled: draws from the teacher (unbiased) | topk: top-k log-probabilities + tail
    signal: str = one_of("hidden", "sampled", "topk")
    top_k: int = positive(32)
    draws: int = positive(12)  # sampled signal: ids drawn per position (unbiased KL; README: bench_targets)
    max_tokens_per_batch: int = positive(4096)  # per forward pass; larger requests are split, never refused
    max_batch_size: int = 8  # Serve-side batching of concurrent requests (@serve.batch)
    batch_wait_timeout_s: float = 0.02
    num_cpus: float = 1.0  # Ray resources per replica
    num_gpus: float = 0.0
    resources: Dict[str, float] = field(default_factory=dict)  # custom resources per replica, e.g. {teacher_node: 1}
    num_threads: int = 1  # torch intra-op threads per replica
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    health_check_period_s: float = 10.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # cached teacher: where the precomputed shards live
    write_through: bool = False  # cached teacher: answer misses live (transformers) and store them
    cache_memory_mb: float = positive(512)  # cached teacher: decoded row groups a replica keeps (it pages the rest)
    max_model_len: int = 2048  # vLLM teacher: longest sequence the engine accepts
    kv_cache_gib: int = 1  # vLLM teacher on CPU: memory for its KV cache (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.8  # vLLM teacher on GPU: its share of the GPU (prompt-logprob buffers are not in it)
    tensor_parallel_size: int = positive(1)  # vLLM teacher: GPUs per engine (set teacher.num_gpus to match)
    vllm_url: Optional[str] = None  # vLLM teacher: an external OpenAI-compatible server instead of an engine
    # Load the teacher (fp32) to score the held-out rows and the task: None, when the loss uses it and
    # it is not a cache (a CE-only stage 2 loads no teacher anywhere); true or false to insist.
    score_heldout: Optional[bool] = None


@dataclass
class StudentConfig(Frozen):
    init_from: str = "${teacher.model}"  # the full-precision model converted in stage 1
    # false: train `init_from` itself in full precision (the paper's stage 0, FP16-SFT of the teacher on
    # the task, usually with distillation=ce_only); its student/ is a plain transformers model that
    # teacher.model can name; with num_layers, a full-precision truncated student (the reference for what
    # the depth alone costs)
    ternary: bool = True
    checkpoint_path: Optional[str] = None  # start from a saved BitNet student instead
    subln: str = one_of("paper", "allnorm", "none")  # paper (before o_proj and down_proj) | allnorm (before every BitLinear) | none
    num_layers: Optional[int] = None  # keep only the first N decoder layers (a smaller student)
    # gradual ternarisation: weights and activations enter as x + mix * (quant(x) - x), mix rising
    # from 0 at step 1 to 1 after this many optimizer steps (0: ternary from the first step)
    quant_warmup_steps: int = 0
    quant_warmup_schedule: str = one_of("linear", "sigmoid")  # how mix rises over the warm-up
    compile: bool = False  # torch.compile the BitNet quantizers (no gain measured on CPU; ~30 s start)
    # written beside the run's student/ when training ends, each checked before the run starts:
    # packed (student-packed/) | gguf (student.gguf, for llama.cpp) | hf (student/ is this format: checked only)
    export: List[str] = field(default_factory=list)


@dataclass
class DistillationConfig(Frozen):
    ce_weight: float = 1.0
    logits_weight: float = 10.0  # lambda
    # gamma, in the units of `attention_normalization`: 1e4 by issue 25's sweep (bench/README.md), better
    # than the paper's 1e5 on all three seeds at 4x the default budget; the paper's is in distillation=classification
    attention_weight: float = 1.0e4
    # tau, applied once (to the raw teacher logits: by the loss for `hidden`, by the teacher for sparse
    # signals). 1 by the sweep (README); the paper's 5 is in distillation=classification/summarization.
    temperature: float = 1.0
    temperature_squared: bool = True  # multiply L_LD by tau^2 (official code); the paper's equation omits it
    teacher_layer: int = -6  # Q/K/V layer for attention distillation (negative counts from the end)
    student_layer: int = -6
    split_heads: int = positive(32)  # relation heads each model's Q/K/V width is re-split into
    attention_temperature: float = 1.0
    # reference: L_AD divided by split_heads, as the official BitDistill code (gamma 1e5 is calibrated to
    # it) | paper: the paper's Eq. 11, split_heads times larger (gamma 1e5 reference == 3125 paper at 32)
    attention_normalization: str = one_of("reference", "paper")
    chunk_tokens: int = positive(512)  # CE + L_LD are computed this many tokens at a time (memory bound)


@dataclass
class SourceConfig(Frozen):
    name: str = MISSING
    # shakespeare | python_stdlib | python_docs (built in, offline) | text (.txt/.md/... files under `path`)
    # | jsonl | parquet (files under `path`) | hf_disk (datasets.save_to_disk folder) | hf_hub (a hub name)
    # | shakespeare_genre | stdlib_docstring (built-in prompt/response tasks, split train | test)
    kind: str = MISSING
    path: Optional[str] = None
    weight: float = 1.0  # relative: the weights are normalised to sum to one
    split: str = "train"  # datasets and built-in tasks: which split
    # jsonl / parquet / datasets records: text (one document per record) | messages (a chat: a list of
    # {role, content}) | prompt_response; the loss learns only the responses (data/records.py)
    format: str = one_of("text", "messages", "prompt_response")
    text_field: str = "text"  # the field (column) of each format
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    response_field: str = "response"
    prompt_template: str = "{prompt}\n"  # prompt_response: the prompt as the model reads it


@dataclass
class DataConfig(Frozen):
    sources: List[SourceConfig] = field(default_factory=list)
    seq_len: int = positive(256)
    # Training rows: false, one document per row (padded); true, documents end to end filling every
    # row, with attention, positions, labels and attention relations kept inside each document
    # (data/packing.py). Held-out and probe rows stay one document per row either way.
    pack_documents: bool = False
    # How records are rendered: auto (the tokenizer's chat template where it has one, else plainly) |
    # tokenizer (its template; an error without one) | plain (data/records.py)
    chat_template: str = one_of("auto", "tokenizer", "plain")
    # Optional: read only each source's first units (canonical order) up to about this many tokens.
    # Off by default: sources are read lazily, unit by unit, as the run consumes them.
    max_tokens_per_source: Optional[int] = None
    shuffle_units: int = positive(4)  # units whose rows are shuffled together (memory: this many per source)
    readers: int = positive(2)  # actors that read, tokenize and cut units for the mixture
    reader_cpus: float = 0.0  # CPUs Ray books per reader (0: they share the run's cores)
    heldout_fraction: float = 0.05  # share of each source's documents held out (chosen by name hash)
    heldout_sequences: int = 4  # held-out sequences per source used for the summary's loss
    probe_fraction: float = 0.05  # share of documents set aside for the influence probe (never trained on)
    teacher_batch_size: int = 4  # sequences per teacher request (at most: one never spans two steps)
    # Teacher requests awaiting an answer per training worker (backpressure). 1: the teacher scores the
    # next rows while the student trains, and a run's answers are reproducible, so resumed influence
    # updates equal the originals. More lets Serve batch requests into one forward pass (faster on a
    # GPU), whose answers then depend in their last bits on which requests shared it.
    teacher_max_in_flight: int = positive(1)
    teacher_max_attempts: int = positive(4)  # per batch, with exponential backoff, when a teacher replica fails
    cache_dir: str = "~/.cache/wrinklefree-distillation"


@dataclass
class InfluenceConfig(Frozen):
    """Influence-weighted mixture (training/influence.py): every `update_interval` optimizer steps, score
    each source by the cosine of its gradient with the probe set's, and move the weights."""
    enabled: bool = False
    probe_source: Optional[str] = None  # whose probe documents form the target set (default: the first source)
    probe_sequences: int = positive(8)
    update_interval: int = positive(5)  # optimizer steps
    delay_steps: int = positive(2)  # an update computed after step s is used from step s + delay (pipeline slack)
    batch_size: int = positive(4)  # sequences per source per estimate
    pool_sequences: int = positive(64)  # training rows per source, read at the start, that estimates draw from
    eta: float = 2.0  # step size of the multiplicative update (scores are cosines in [-1, 1])
    smoothing: float = 0.5  # EMA factor on the scores
    floor: float = 0.05  # no weight falls below this


@dataclass
class TrainingConfig(Frozen):
    max_steps: int = positive(30)  # optimizer updates
    batch_size: int = positive(4)  # sequences per worker per micro-batch
    grad_accum: int = positive(1)
    lr: float = 1.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    num_workers: int = positive(1)
    # ddp: every worker holds the whole student | fsdp: each holds 1/num_workers of its weights,
    # gradients and AdamW moments (torch FSDP2), for a student too large for one device (training/parallel.py)
    parallelism: str = one_of("ddp", "fsdp")
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    worker_resources: Dict[str, float] = field(default_factory=dict)  # custom resources, e.g. {student_node: 1}
    num_threads: int = 2  # torch intra-op threads per worker
    autocast: str = one_of("none", "bf16")  # none | bf16 (forward under bfloat16 autocast; master weights stay fp32)
    # recompute each decoder layer's activations in the backward pass instead of keeping them:
    # ~1/3 more compute for far less activation memory (a 1.7B student at 16k tokens per micro-batch)
    activation_checkpointing: bool = False
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    max_failures: int = 1  # Ray Train restarts failed workers from the latest checkpoint this many times
    max_nan_steps: int = 10  # optimizer steps skipped for a non-finite gradient before the run stops
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # every N steps, log each source's held-out loss (eval_<source>); 0: never


@dataclass
class TaskConfig(Frozen):
    """A task the run is scored on (tasks/metrics.py): before and after training, every
    `training.eval_every` steps and by `distill eval --task`. A task YAML (configs/task/) sets this,
    the training source and the paper's loss preset: `distill task=shakespeare_genre`."""
    name: Optional[str] = None  # None: no task metrics
    # Its held-out records (format prompt_response or messages). Unset: kind "" (a default that
    # `task.test={...}` merges into: OmegaConf cannot merge a mapping into a None node).
    test: SourceConfig = field(default_factory=lambda: SourceConfig(name="", kind=""))
    labels: List[str] = field(default_factory=list)  # a classification task's label words
    metrics: List[str] = field(default_factory=list)  # accuracy | label_accuracy | rouge_l | exact_match
    records: int = positive(64)  # held-out records scored each time (spread over the test source's first units)
    max_new_tokens: int = positive(16)  # the longest greedy answer


@dataclass
class RecipeConfig(Frozen):
    """The BitDistill stages as one command (recipe.py), each a run of its own under
    `run.output_dir/run.name/`: teacher_sft fine-tunes the teacher in full precision on data.sources
    (CE only; the paper's FP16-SFT), pretrain continues pre-training the converted student with CE on
    `pretrain_sources` (stage 2), distill distils the (fine-tuned) teacher into that student on
    data.sources (stage 3, this config's loss). Each stage's output is the next one's input; a stage
    whose student exists is skipped, one that stopped resumes."""
    stages: List[str] = field(default_factory=list)  # of teacher_sft, pretrain, distill, in that order; []: one run
    teacher_sft_steps: int = positive(60)
    teacher_sft_lr: float = 1.0e-4  # full-precision fine-tuning wants a smaller step than a ternary student
    pretrain_steps: int = positive(60)
    pretrain_sources: List[SourceConfig] = field(default_factory=list)  # stage 2's general text ([]: data.sources)


@dataclass
class RunConfig(Frozen):
    name: Optional[str] = None  # default: distill-<timestamp>
    output_dir: str = "outputs"  # the local run folder: metrics, ledger, plots, summary (and, by default, all else)
    # Checkpoints and the final student (and a copy of the small outputs): a folder every node can reach
    # or a URI (s3://bucket/runs, gs://..., file:///mnt/shared/runs). None: inside the local run folder.
    storage_path: Optional[str] = None
    ray_address: Optional[str] = None  # None: join RAY_ADDRESS if set, else start a local cluster
    num_cpus: Optional[int] = None  # local cluster only
    # Fail at once when the live nodes cannot hold training.num_workers (Ray Train would wait forever);
    # turn off on an autoscaling cluster whose worker nodes start on demand.
    check_placement: bool = True
    resume: bool = False  # continue run.name from its latest checkpoint (same config required)
    progress: bool = True
    verbose: bool = False  # stream Ray's own logs (workers, Ray Data, Serve, Train) to the terminal
    # Stop with an error when no optimizer step finishes for this long (the first one includes
    # starting the workers and loading the student) instead of waiting forever; 0 waits forever.
    stall_timeout_s: float = 1800.0


@dataclass
class Config(Frozen):
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    run: RunConfig = field(default_factory=RunConfig)
