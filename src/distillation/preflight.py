"""Every input check of a run, before Ray starts and before a run folder exists.

Bad input then costs seconds and leaves nothing behind: the error is one line naming what was
wrong and what was expected (the CLI exits 2).
"""

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, cast

from omegaconf import DictConfig, OmegaConf

from distillation.config import Config, to_yaml
from distillation.config.schema import DistillationConfig, RunConfig, StudentConfig, TeacherConfig
from distillation.data.corpus import open_sources
from distillation.data.records import uses_chat_template
from distillation.data.sources import SourceSpec, changed_files
from distillation.errors import DistillError
from distillation.losses import QKV
from distillation.storage import check_storage, check_writable, exists, join, read_text, run_storage, train_location
from distillation.tasks.probe import TaskProbe, task_probe
from distillation.teachers.resolve import ResolvedTeacher, check_cache, resolve_teacher
from distillation.training.plan import needs_teacher

# What may differ when a run resumes: the cluster it joins, how long it trains, how often it logs and
# saves, how the student is spread over the workers (the same updates; checkpoints are whole either
# way). Everything else (run.storage_path included: the checkpoints live there) decides which
# samples, targets and updates the steps see, or where the run is.
RESUMABLE_CHANGES = ("run.name", "run.output_dir", "run.ray_address", "run.num_cpus", "run.check_placement",
                     "run.resume", "run.progress", "run.verbose", "run.stall_timeout_s", "training.max_steps",
                     "training.checkpoint_every", "training.keep_checkpoints", "training.log_every",
                     "training.eval_every", "training.max_failures", "training.max_nan_steps", "training.parallelism",
                     "student.export")


@dataclass
class Preflight:
    teacher: ResolvedTeacher
    uses_teacher: bool
    run_dir: Path  # not created yet (an existing one when resuming)
    resumed: Optional[dict]  # the latest checkpoint's train state when resuming
    resumed_checkpoint: Optional[Any]  # a ray.train.Checkpoint: read it with as_directory() (storage may be remote)
    sources: Dict[str, SourceSpec]  # opened and checked, not read
    task: Optional[TaskProbe] = None  # the task's held-out examples (task.name set)


def preflight(cfg: Config) -> Preflight:
    """Every input check, before Ray starts or a run folder exists: the teacher, shapes, sources,
    storage and, on resume, what may change. Raises a one-line DistillError."""
    teacher = resolve_teacher(cfg.teacher, cfg.student, cfg.distillation, cfg.data.cache_dir)
    uses_teacher = needs_teacher(cfg.distillation)
    if uses_teacher:
        check_teacher_kind(cfg.teacher, cfg.distillation.temperature, cfg.data.seq_len, teacher)
        check_cache(cfg.teacher, cfg.distillation.temperature, teacher, cfg.data.cache_dir)
    check_shapes(cfg.teacher, cfg.student, cfg.distillation, cfg.data.seq_len, teacher)
    check_exports(cfg.student, cfg.teacher.trust_remote_code, teacher)
    if any(s.format != "text" for s in cfg.data.sources):  # records: the template they render with exists
        uses_chat_template(teacher.tokenizer, cfg.data.chat_template)
    if cfg.run.storage_path:
        check_storage(cfg.run.storage_path)
    run_dir = run_folder(cfg.run, to_yaml(cfg))
    checkpoints = train_location(cfg.run.storage_path, run_dir)
    resumed, checkpoint = latest_checkpoint(checkpoints) if cfg.run.resume else (None, None)
    if cfg.run.resume and resumed is None:
        from distillation.console import say

        say(f"run.resume=true: no checkpoint under {checkpoints} yet, so the run starts at step 0")
    if cfg.run.resume and resumed and cfg.training.max_steps < resumed["step"]:
        raise DistillError(f"training.max_steps={cfg.training.max_steps} is below the step the run resumes from "
                           f"({resumed['step']}); a resumed run can only train as long or longer")
    sources = open_sources(cfg.data, cfg.task.labels)
    if resumed:
        check_same_data(resumed["data"], sources, saved_stamps(cfg.run.storage_path, run_dir))
    task = task_probe(cfg.task, cfg.data, teacher.ref)
    return Preflight(teacher, uses_teacher, run_dir, resumed, checkpoint, sources, task)


STAMPS_FILE = "sources.json"  # every unit's file, size and modification time at the run's start


def saved_stamps(storage_path: Optional[str], run_dir: Path) -> Optional[dict]:
    """The run's STAMPS_FILE (the local folder's, else the storage copy), or None (a run from before it)."""
    local, shared = run_dir / STAMPS_FILE, run_storage(storage_path, run_dir)
    text = local.read_text() if local.is_file() else (read_text(join(shared, STAMPS_FILE)) if shared else None)
    return json.loads(text) if text else None


def check_same_data(plan_state: dict, sources: Dict[str, SourceSpec], stamps: Optional[dict] = None) -> None:
    """A resumed run continues the checkpoint's cursors into each source's units, so the units must be
    the ones it drew from: same sources, same files (names, sizes, modification times)."""
    from distillation.data.mixture import MixturePlan

    MixturePlan.from_state(plan_state)  # a plan from before streaming is a clear error
    names = list(sources)
    units = [len(sources[n].units) for n in names]
    if plan_state["names"] != names or plan_state["units"] != units:
        raise DistillError(f"the checkpoint's data plan ({dict(zip(plan_state['names'], plan_state['units']))} units) "
                           f"does not match this run's sources ({dict(zip(names, units))} units); resume with the same data")
    saved = plan_state["fingerprints"]
    changed = [n for n in names if saved.get(n) != sources[n].fingerprint]
    if changed:
        def which(n: str) -> str:
            files = changed_files(stamps[n], sources[n]) if stamps and n in stamps else []
            return f": {', '.join(files)}" if files else ""

        raise DistillError("the files of source " + ", ".join(
            f"'{n}' (fingerprint {saved.get(n, '')[:12]} -> {sources[n].fingerprint[:12]}{which(n)})" for n in changed)
            + " changed since the checkpoint (its files' names, sizes or modification times; for a built-in "
              "source the Python version, for a dataset its content); resume with the same files, or start a new run")


def check_teacher_kind(t: TeacherConfig, temperature: float, seq_len: int, teacher: ResolvedTeacher) -> None:
    if t.kind != "vllm":
        return
    from distillation.teachers.vllm import VLLMServerTeacher, check_vllm_settings

    check_vllm_settings(temperature, teacher.qkv_layer, t.signal)
    if seq_len >= t.max_model_len:
        raise DistillError(f"data.seq_len={seq_len} does not fit teacher.max_model_len="
                           f"{t.max_model_len}; raise max_model_len or shorten the rows")
    if not t.vllm_url and t.tensor_parallel_size > 1 and t.num_gpus != t.tensor_parallel_size:
        raise DistillError(f"teacher.tensor_parallel_size={t.tensor_parallel_size} shards the engine over that many "
                           f"GPUs, but a replica books teacher.num_gpus={t.num_gpus:g}; set them equal")
    if t.vllm_url:  # reachable and serving a model, before anything starts
        VLLMServerTeacher(t.vllm_url, t.top_k, 1.0)


def _widths(config) -> dict:
    """q, k, v widths (heads x head_dim; GQA keys and values have their own)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return dict(zip(QKV, (config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)))


def check_shapes(t: TeacherConfig, student: StudentConfig, d: DistillationConfig, seq_len: int,
                 teacher: ResolvedTeacher) -> None:
    """Row length against both models' positions; Q/K/V layers and widths against split_heads."""
    from transformers import AutoConfig

    configs = {"teacher": AutoConfig.from_pretrained(teacher.model_dir, trust_remote_code=t.trust_remote_code),
               "student": student_config(student, t.trust_remote_code, teacher)[0]}
    for who, config in configs.items():
        limit = getattr(config, "max_position_embeddings", None)
        if limit and seq_len > limit:
            raise DistillError(f"data.seq_len={seq_len} exceeds the {who}'s {limit} positions "
                               f"(max_position_embeddings); choose data.seq_len <= {limit}")
    if seq_len > t.max_tokens_per_batch:
        raise DistillError(f"data.seq_len={seq_len} exceeds teacher.max_tokens_per_batch="
                           f"{t.max_tokens_per_batch} (a row must fit one forward pass); raise the budget")
    if t.signal == "topk" and t.top_k > teacher.vocab_size:
        raise DistillError(f"teacher.top_k={t.top_k} exceeds the vocabulary ({teacher.vocab_size} ids)")
    if d.attention_weight <= 0:
        return
    student_layers = configs["student"].num_hidden_layers
    if student.num_layers and not student.checkpoint_path:
        student_layers = min(student_layers, student.num_layers)
    for who, layer, count in (("teacher", d.teacher_layer, configs["teacher"].num_hidden_layers),
                              ("student", d.student_layer, student_layers)):
        if not -count <= layer < count:
            raise DistillError(f"distillation.{who}_layer={layer} is out of range for a {who} with {count} layers")
        for key, width in _widths(configs[who]).items():
            if width % d.split_heads:
                raise DistillError(f"distillation.split_heads={d.split_heads} does not divide the {who}'s {key} width "
                                   f"{width}; choose a split_heads that divides every Q/K/V width "
                                   f"({sorted(set(_widths(configs['teacher']).values()) | set(_widths(configs['student']).values()))})")


def student_config(student: StudentConfig, trust_remote_code: bool, teacher: ResolvedTeacher) -> tuple:
    """(base config, SubLN placement) of the student the run starts from: a saved student's own, in any
    layout (student/layout.py), or the model stage 1 converts."""
    if student.checkpoint_path:
        from distillation.student.checkpoint import read_student_config
        from distillation.student.layout import base_config

        saved = read_student_config(student.checkpoint_path)
        return base_config(saved), saved["bitnet"]["subln"]
    from transformers import AutoConfig

    assert teacher.student_dir is not None  # resolve_teacher sets it
    return AutoConfig.from_pretrained(teacher.student_dir, trust_remote_code=trust_remote_code), student.subln


def check_exports(student: StudentConfig, trust_remote_code: bool, teacher: ResolvedTeacher) -> None:
    """`student.export`: each format known and able to hold this student (architecture, SubLN, tokenizer)."""
    from distillation.student.export import FORMATS, export_problem
    from distillation.student.gguf_export import read_tokenizer_json

    if not student.export:
        return
    if not student.ternary and set(student.export) - {"hf"}:
        raise DistillError(f"student.export={list(student.export)}: a full-precision model (student.ternary=false) "
                           f"is written only as hf (its student/ folder)")
    unknown = [f for f in student.export if f not in FORMATS]
    if unknown:
        raise DistillError(f"student.export={list(student.export)}: {unknown[0]!r} is not one of {', '.join(FORMATS)}")
    config, subln = student_config(student, trust_remote_code, teacher)
    for fmt in student.export:
        problem = export_problem(config, subln, fmt)
        if problem:
            raise DistillError(f"student.export={fmt} cannot hold this student: {problem}")
        if fmt == "gguf":
            read_tokenizer_json(teacher.model_dir)  # the tokenizer the run's student/ is saved with


def run_folder(r: RunConfig, config_yaml: str) -> Path:
    """The run's folder: for a new run, one that does not exist yet under a writable parent; on
    resume, the existing run, whose configuration (`config_yaml` now) may differ only in RESUMABLE_CHANGES."""
    name = r.name or datetime.now().strftime("distill-%Y%m%d-%H%M%S")
    out = Path(r.output_dir).expanduser().resolve() / name
    if r.resume:
        shared = run_storage(r.storage_path, out)
        saved_text = (out / "config.yaml").read_text() if (out / "config.yaml").is_file() else (
            read_text(join(shared, "config.yaml")) if shared else None)  # a job's lost working folder: the storage copy
        if saved_text is None:
            raise DistillError(f"run.resume=true but {out} holds no run (config.yaml missing); check run.name"
                               + (f" and run.storage_path ({shared})" if shared else ""))
        # a config.yaml is a mapping: OmegaConf.create gives a DictConfig (typed DictConfig | ListConfig)
        saved = with_defaults(cast(DictConfig, OmegaConf.create(saved_text)))
        now = cast(DictConfig, OmegaConf.create(config_yaml))
        changed = config_changes(saved, now)
        if not changed and saved.training.max_steps != now.training.max_steps:
            from distillation.console import say

            say(f"training.max_steps {saved.training.max_steps} -> {now.training.max_steps}: the cosine schedule "
                f"stretches to the new length from the resume step on (the learning rate rises accordingly)")
        if changed:
            raise DistillError(f"run.resume=true with settings that differ from {out / 'config.yaml'}: "
                               f"{', '.join(changed)}; a resumed run may change only {', '.join(RESUMABLE_CHANGES)}")
        return out
    if out.exists():
        raise DistillError(f"run folder {out} already exists; choose another run.name, or run.resume=true")
    check_writable(next(p for p in [out, *out.parents] if p.exists()), f"run folder {out}")
    return out


def with_defaults(saved: DictConfig) -> DictConfig:
    """A saved run's config with the settings added since it was written at their defaults (which is
    what that run used); as saved if it holds a key the schema no longer has (then it is a change)."""
    from distillation.config.schema import Config

    try:
        return cast(DictConfig, OmegaConf.merge(OmegaConf.structured(Config), saved))  # merging onto a DictConfig
    except Exception:  # omegaconf raises several types for keys and values the schema does not take
        return saved


def config_changes(saved: DictConfig, now: DictConfig) -> List[str]:
    """Dotted keys whose values differ, other than the resumable ones."""
    def flat(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from flat(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node

    a, b = dict(flat(OmegaConf.to_container(saved))), dict(flat(OmegaConf.to_container(now)))
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key)
                  and not any(key == r or key.startswith(r + ".") for r in RESUMABLE_CHANGES))


def latest_checkpoint(location: str) -> tuple:
    """(train state, Checkpoint) of the latest checkpoint Ray Train registered under `location`
    (a local folder or a URI), or (None, None)."""
    from ray.train import Result

    from distillation.training.checkpoint import read_state

    if not exists(join(location, "checkpoint_manager_snapshot.json")):
        return None, None
    checkpoint = Result.from_path(location).checkpoint
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as folder:
        return read_state(Path(folder)), checkpoint
