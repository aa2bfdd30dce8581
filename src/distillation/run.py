"""The driver: one distillation run on a Ray cluster, from config to summary.

assets -> Ray cluster -> corpus (tokenized with Ray Data) -> Mixture actor + teacher pool (Ray Serve)
-> TorchTrainer (each worker streams its rows: Mixture draw + teacher answer, Ray Data) -> strict
reload of the final student -> held-out loss -> summary. `run.resume=true` continues a run.
"""

import json
import os
import shutil
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import ray
from omegaconf import DictConfig, OmegaConf

from distillation.config import to_yaml
from distillation.data.corpus import Corpus, prepare_corpus
from distillation.data.mixture import validate_weights
from distillation.errors import DistillError
from distillation.models import TOKENIZER_FILES, load_causal_lm, load_tokenizer, resolve_model
from distillation.student import load_student
from distillation.teachers.deployment import deploy_teacher
from distillation.training.evaluate import heldout_loss
from distillation.training.loop import needs_teacher, train_loop_per_worker
from distillation.training.metrics import (MetricsBoard, append_jsonl, dominance_warning, plot_losses, plot_mixture,
                                          read_jsonl)
from distillation.training.student_init import build_student, set_compile
from distillation.vocab import check_vocab


def say(message: str) -> None:
    print(f"[distill] {message}", flush=True)


def _run_dir(cfg: DictConfig) -> Path:
    name = cfg.run.name or datetime.now().strftime("distill-%Y%m%d-%H%M%S")
    out = Path(cfg.run.output_dir).expanduser().resolve() / name
    if cfg.run.resume:
        if not (out / "config.yaml").is_file():
            raise DistillError(f"run.resume=true but {out} holds no run (config.yaml missing); check run.name")
        saved, now = OmegaConf.create((out / "config.yaml").read_text()), OmegaConf.create(to_yaml(cfg))
        for key in ("run",):
            saved.pop(key, None)
            now.pop(key, None)
        if saved != now:
            raise DistillError(f"run.resume=true with a configuration that differs from {out / 'config.yaml'}; "
                               f"a resumed run must use the same settings (only run.* may change)")
        return out
    if out.exists():
        raise DistillError(f"run folder {out} already exists; choose another run.name, or run.resume=true")
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise DistillError(f"cannot create run folder {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise DistillError(f"run folder {out} is not writable")
    return out


def latest_checkpoint_state(run_dir: Path) -> Optional[dict]:
    """The train state of the run's latest registered checkpoint (Ray Train's own record), if any."""
    from ray.train import Result

    from distillation.training.checkpoint import read_state

    storage = run_dir / "ray" / "train"
    if not (storage / "checkpoint_manager_snapshot.json").is_file():
        return None
    checkpoint = Result.from_path(str(storage)).checkpoint
    return read_state(Path(checkpoint.path)) if checkpoint else None


def init_ray(cfg: DictConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = {"address": address} if address else {"num_cpus": cfg.run.num_cpus, "dashboard_host": "127.0.0.1"}
    context = ray.init(log_to_driver=True, **kwargs)
    say(f"Ray cluster ready; dashboard: http://{context.dashboard_url}" if context.dashboard_url
        else "Ray cluster ready (no dashboard)")


def create_mixture(cfg: DictConfig, corpus: Corpus, name: str, resume_state: Optional[dict] = None):
    """The named Mixture actor the workers' pipelines draw from (from a checkpoint's state on resume)."""
    from distillation.data.mixture import Mixture, MixturePlan
    from distillation.training.loop import influence_steps

    t = cfg.training
    names = [s.name for s in cfg.data.sources]
    state = resume_state or MixturePlan(
        names, [len(corpus.train[n].rows) for n in names], validate_weights([s.weight for s in cfg.data.sources], names),
        t.seed, t.batch_size * t.grad_accum * t.num_workers, influence_steps(cfg.influence, t.max_steps),
        cfg.influence.delay_steps).state()
    if state["names"] != names or state["sizes"] != [len(corpus.train[n].rows) for n in names]:
        raise DistillError("the checkpoint's data plan does not match this run's sources; resume with the same data")
    return Mixture.options(name=name).remote(state, {n: corpus.train[n].rows for n in names},
                                             {n: corpus.train[n].lengths for n in names})


def _train(cfg: DictConfig, run_dir: Path, loop_config: dict, start_step: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.training
    board = MetricsBoard.options(name=loop_config["board"]).remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **t.worker_resources}),
        # The same name and storage path on a resumed driver: Ray Train restores its latest checkpoint.
        run_config=RunConfig(name="train", storage_path=str(run_dir / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_fit(trainer, outcome)), daemon=True)
    thread.start()
    try:
        rows = _follow(board, thread, start_step, t.max_steps, run_dir, cfg.run.progress, cfg.run.stall_timeout_s)
    finally:
        ray.kill(board)  # named, so it would outlive this run in a driver that goes on (tests, notebooks)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], rows


def _fit(trainer, outcome):
    try:
        return trainer.fit()
    except Exception as exc:  # surfaced in the main thread
        outcome["error"] = exc


def _follow(board, thread, start_step: int, max_steps: int, run_dir: Path, progress: bool, stall_timeout_s: float):
    """Copy the board's metrics and ledger to files as they grow (a killed driver keeps what it saw);
    a run with no finished step for `stall_timeout_s` is an error, not a silent wait."""
    from tqdm import tqdm

    rows, ledger, last_step, warned = [], 0, start_step, False
    last_progress = time.monotonic()
    bar = tqdm(total=max_steps, initial=start_step, desc="distill", unit="step", disable=not progress,
               dynamic_ncols=True)
    while True:
        alive = thread.is_alive()
        fresh = ray.get(board.since.remote({"metrics": len(rows), "ledger": ledger}))
        if fresh["ledger"]:
            ledger += len(fresh["ledger"])
            append_jsonl(run_dir / "ledger.jsonl", fresh["ledger"])
            last_progress, last_step = time.monotonic(), max(e["step"] for e in fresh["ledger"])
        elif alive and stall_timeout_s and time.monotonic() - last_progress > stall_timeout_s:
            bar.close()
            raise DistillError(
                f"no optimizer step finished in {stall_timeout_s:.0f} s (last finished: step {last_step}); "
                f"free cluster resources now: {ray.available_resources()}. The workers' logs and the Ray "
                f"dashboard show where they wait; raise run.stall_timeout_s if a step really takes this long")
        new = fresh["metrics"]
        if new:
            rows.extend(new)
            append_jsonl(run_dir / "metrics.jsonl", new)
            last = new[-1]
            bar.update(last["step"] - bar.n)
            bar.set_postfix(loss=f"{last['loss']:.3f}", ce=f"{last['ce']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
            warning = dominance_warning(last)
            if warning and not warned:
                warned = True
                message = f"warning at step {last['step']}: {warning}"
                bar.write(f"[distill] {message}") if progress else say(message)
        if not alive:
            break
        thread.join(timeout=1.0)
    bar.close()
    return rows


def resolve_teacher(cfg: DictConfig):
    """(teacher dir, tokenizer, shared vocabulary size, Q/K/V layer or None), checked against the student."""
    teacher_dir = resolve_model(cfg.teacher.model, cfg.data.cache_dir)
    tokenizer = load_tokenizer(teacher_dir, cfg.teacher.trust_remote_code)
    student_dir = (Path(cfg.student.checkpoint_path).expanduser() if cfg.student.checkpoint_path
                   else resolve_model(cfg.student.init_from, cfg.data.cache_dir))
    if not (student_dir / "config.json").is_file():
        raise DistillError(f"student checkpoint '{student_dir}' does not exist or has no config.json")
    student_tok_dir = student_dir if (student_dir / "tokenizer.json").is_file() else teacher_dir
    vocab_size = check_vocab(tokenizer, config_vocab(teacher_dir), load_tokenizer(student_tok_dir),
                             config_vocab(student_dir))
    qkv_layer = cfg.distillation.teacher_layer if cfg.distillation.attention_weight > 0 else None
    return teacher_dir, tokenizer, vocab_size, qkv_layer


def check_cache(cfg: DictConfig, teacher_dir: Path, qkv_layer, vocab_size: int) -> None:
    """A replay-only cached teacher needs its cache to exist: say so before anything starts."""
    if cfg.teacher.kind != "cached" or cfg.teacher.write_through:
        return
    from distillation.teachers.cache import TeacherCache, teacher_signature
    from distillation.teachers.deployment import signal_settings

    TeacherCache(cfg.teacher.cache_dir, teacher_signature(teacher_dir, signal_settings(cfg, qkv_layer, vocab_size)),
                 create=False)


def run(cfg: DictConfig) -> dict:
    started = time.time()
    set_compile(cfg.student.compile)
    # Every input check comes before anything is written, so bad input leaves no half-made run.
    teacher_dir, tokenizer, vocab_size, qkv_layer = resolve_teacher(cfg)
    use_teacher = needs_teacher(cfg.distillation)
    if use_teacher and cfg.teacher.kind == "vllm":
        from distillation.teachers.vllm import VLLMServerTeacher, check_vllm_settings

        check_vllm_settings(cfg.distillation.temperature, qkv_layer, cfg.teacher.signal)
        if cfg.teacher.vllm_url:  # reachable and serving a model, before anything starts
            VLLMServerTeacher(cfg.teacher.vllm_url, cfg.teacher.top_k, 1.0)
    if use_teacher:
        check_cache(cfg, teacher_dir, qkv_layer, vocab_size)
    student = build_student(cfg)
    say(f"teacher {cfg.teacher.model} ({cfg.teacher.kind}{'' if use_teacher else ', not needed by this loss'}); "
        f"student: BitNet, subln={cfg.student.subln}, {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters")
    init_ray(cfg)
    if cfg.run.check_placement:
        check_placement(cfg)
    run_dir = _run_dir(cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    say(f"run folder: {run_dir}")
    resumed = latest_checkpoint_state(run_dir) if cfg.run.resume else None
    start_step = resumed["step"] if resumed else 0
    if resumed:
        say(f"resuming from the checkpoint of step {start_step}")
    corpus = prepare_corpus(cfg, str(teacher_dir), tokenizer)
    say("data: " + ", ".join(f"{n} {len(v.rows)} rows (sha256 {corpus.digests[n][:12]})" for n, v in corpus.train.items())
        + f"; held-out {len(corpus.heldout.rows)} rows; probe {len(corpus.probe.rows)} rows")

    heldout = (corpus.heldout, corpus.heldout_bytes)
    student_before = heldout_loss(student, *heldout)
    del student
    teacher_eval = None  # a cached teacher's point is not loading the model, so it is not scored here
    if cfg.teacher.kind != "cached":
        teacher_eval = heldout_loss(load_causal_lm(teacher_dir, "float32", cfg.teacher.trust_remote_code), *heldout)
    say(f"held-out loss before training: student {student_before['loss']:.3f}"
        + (f", teacher {teacher_eval['loss']:.3f}" if teacher_eval else ""))

    app_name, teacher_stats = None, None
    mixture_name = f"distill-mixture-{run_dir.name}"
    mixture = create_mixture(cfg, corpus, mixture_name, resumed["data"] if resumed else None)
    try:
        if use_teacher:
            app_name = f"teacher-{run_dir.name}"
            handle = deploy_teacher(cfg, str(teacher_dir), qkv_layer, vocab_size, app_name)
            say(f"teacher pool up: {handle.describe.remote().result()}")
        loop_config = {"cfg": OmegaConf.to_container(cfg, resolve=True), "board": f"distill-metrics-{run_dir.name}",
                       "mixture": mixture_name, "app_name": app_name, "vocab_size": vocab_size,
                       "teacher_dir": str(teacher_dir),
                       "probe": (corpus.probe.rows, corpus.probe.lengths),
                       "eval": {n: (p.rows, p.lengths) for n, p in corpus.heldout_by_source.items() if len(p.rows)}}
        result, rows = _train(cfg, run_dir, loop_config, start_step)
        mixture_history = ray.get(mixture.history.remote())
        if use_teacher:
            teacher_stats = handle.describe.remote().result()
            handle.flush.remote().result()  # write-through answers reach the cache before the pool goes
    finally:
        if app_name:
            from ray import serve
            serve.delete(app_name)
        ray.kill(mixture)
    if result.checkpoint is None:
        raise DistillError("training ended without a checkpoint")
    final_dir = _export_student(Path(result.checkpoint.path), run_dir / "student", teacher_dir)
    student_after = heldout_loss(load_student(final_dir), *heldout)
    all_rows = read_jsonl(run_dir / "metrics.jsonl")
    if all_rows:
        plot_losses(all_rows, run_dir / "loss.png")
        plot_mixture(mixture_history, [s.name for s in cfg.data.sources], cfg.training.max_steps, run_dir / "mixture.png")
    (run_dir / "mixture.json").write_text(json.dumps(mixture_history, indent=1))
    last = all_rows[-1] if all_rows else {}
    summary = {
        "run_dir": str(run_dir), "student_checkpoint": str(final_dir), "metrics": str(run_dir / "metrics.jsonl"),
        "ledger": str(run_dir / "ledger.jsonl"), "loss_plot": str(run_dir / "loss.png"),
        "tokens_seen": last.get("tokens", 0), "steps": last.get("step", 0), "resumed_from_step": start_step,
        "first": all_rows[0] if all_rows else {}, "last": last, "mixture": mixture_history,
        "heldout": {"student_before": student_before, "student_after": student_after, "teacher": teacher_eval},
        "data_sha256": corpus.digests, "teacher": teacher_stats, "wall_s": time.time() - started,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def check_placement(cfg: DictConfig) -> None:
    """`num_workers` the cluster cannot place would leave Ray Train waiting forever: say so now."""
    t = cfg.training
    need = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.worker_resources}
    fits = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fits += int(min(have.get(k, 0) / v for k, v in need.items() if v > 0)) if need else t.num_workers
    if fits < t.num_workers:
        raise DistillError(f"training.num_workers={t.num_workers} workers of {dict(need)} cannot be placed: the "
                           f"cluster's nodes hold room for {fits}. Lower num_workers or add nodes.")


def config_vocab(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def _export_student(checkpoint_dir: Path, out: Path, tokenizer_dir: Path) -> Path:
    """Copy the final student next to the run, atomically, with the tokenizer so it stands alone."""
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint_dir / "student", staging)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, staging / name)
    shutil.copy2(checkpoint_dir / "config.yaml", staging / "distill_config.yaml")
    os.replace(staging, out)
    return out


def print_summary(s: dict) -> None:
    h = s["heldout"]
    first, last = s["first"], s["last"]
    lines = [
        "", "=== distillation summary ===",
        f"steps {s['steps']}, tokens seen {s['tokens_seen']:,}, wall time {s['wall_s']:.0f} s",
        "loss components (first -> last logged step):",
        *(f"  {k:<20} {first.get(k, 0):10.4f} -> {last.get(k, 0):10.4f}"
          for k in ("loss", "ce_weighted", "logits_kl_weighted", "attention_weighted")),
        "held-out next-token loss (nats/token, bits/byte):",
        f"  student before  {h['student_before']['loss']:.3f}  {h['student_before']['bits_per_byte']:.3f}",
        f"  student after   {h['student_after']['loss']:.3f}  {h['student_after']['bits_per_byte']:.3f}",
        (f"  teacher         {h['teacher']['loss']:.3f}  {h['teacher']['bits_per_byte']:.3f}" if h["teacher"]
         else "  teacher         (cached teacher: not loaded)"),
        "mixture weights (start -> end): " + ", ".join(
            f"{a:.2f} -> {b:.2f}" for a, b in zip(s["mixture"][0]["weights"], s["mixture"][-1]["weights"])),
        *([f"warning: {dominance_warning(last)}"] if dominance_warning(last) else []),
        f"student checkpoint: {s['student_checkpoint']}",
        f"metrics: {s['metrics']}", f"loss plot: {s['loss_plot']}",
    ]
    print("\n".join(lines), flush=True)
