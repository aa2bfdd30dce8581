"""The driver: one distillation run on a Ray cluster, from config to summary.

assets -> Ray cluster -> tokenize (Ray Data) -> teacher pool (Ray Serve) -> annotate (Ray Data)
-> TorchTrainer -> strict reload of the final student -> held-out loss -> summary.
"""

import json
import os
import shutil
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import ray
from omegaconf import DictConfig, OmegaConf

from distillation.config import to_yaml
from distillation.data.mixture import draw_plan, validate_weights
from distillation.data.packing import pack
from distillation.data.pipeline import tokenize_documents, training_dataset
from distillation.data.sources import content_digest, is_heldout, load_documents
from distillation.errors import DistillError
from distillation.models import TOKENIZER_FILES, load_causal_lm, load_tokenizer, resolve_model
from distillation.student import load_student
from distillation.teachers.deployment import DEPLOYMENT_NAME, deploy_teacher
from distillation.training.evaluate import heldout_loss
from distillation.training.loop import train_loop_per_worker
from distillation.training.metrics import MetricsBoard, append_jsonl, plot_losses
from distillation.training.student_init import build_student, set_compile
from distillation.vocab import check_vocab


def say(message: str) -> None:
    print(f"[distill] {message}", flush=True)


def _run_dir(cfg: DictConfig) -> Path:
    name = cfg.run.name or datetime.now().strftime("distill-%Y%m%d-%H%M%S")
    out = Path(cfg.run.output_dir).expanduser().resolve() / name
    if out.exists():
        raise DistillError(f"run folder {out} already exists; choose another run.name")
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise DistillError(f"cannot create run folder {out}: {exc.strerror}") from None
    return out


def init_ray(cfg: DictConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = {"address": address} if address else {"num_cpus": cfg.run.num_cpus, "dashboard_host": "127.0.0.1"}
    context = ray.init(log_to_driver=True, **kwargs)
    say(f"Ray cluster ready; dashboard: http://{context.dashboard_url}" if context.dashboard_url
        else "Ray cluster ready (no dashboard)")


def prepare_data(cfg: DictConfig, tokenizer_dir: str, tokenizer):
    """Packed training sequences per source and held-out sequences with their byte counts."""
    train_docs, heldout_docs, digests = [], [], {}
    for source in cfg.data.sources:
        docs = load_documents(source.name, source.kind, source.path, cfg.data.cache_dir,
                              cfg.data.max_tokens_per_source)
        digests[source.name] = content_digest(docs)
        for doc in docs:
            (heldout_docs if is_heldout(f"{source.name}/{doc.doc_id}", cfg.data.heldout_fraction)
             else train_docs).append(doc)
    tokens = tokenize_documents(train_docs + heldout_docs, tokenizer_dir)
    heldout_ids = {(d.source, d.doc_id) for d in heldout_docs}
    order = {d.source: [] for d in train_docs + heldout_docs}
    for doc in train_docs + heldout_docs:
        order[doc.source].append(doc)
    train, heldout = {}, []
    for source in cfg.data.sources:
        docs, toks = order.get(source.name, []), tokens.get(source.name, [])
        train_tok = [t for d, t in zip(docs, toks) if (d.source, d.doc_id) not in heldout_ids]
        held_tok = [t for d, t in zip(docs, toks) if (d.source, d.doc_id) in heldout_ids]
        train[source.name], _ = pack(train_tok, tokenizer.eos_token_id, cfg.data.seq_len,
                                     cfg.data.max_tokens_per_source)
        held, _ = pack(held_tok, tokenizer.eos_token_id, cfg.data.seq_len,
                       cfg.data.heldout_sequences * cfg.data.seq_len)
        if len(train[source.name]) == 0:
            raise DistillError(f"source '{source.name}' yields no training sequence of {cfg.data.seq_len} tokens")
        heldout.append(held)
    heldout = np.concatenate(heldout)
    heldout_bytes = sum(len(tokenizer.decode(row[1:]).encode("utf-8")) for row in heldout)
    return train, heldout, heldout_bytes, digests


def sample_rows(cfg: DictConfig, train: dict) -> dict:
    names = [s.name for s in cfg.data.sources]
    probs = validate_weights([s.weight for s in cfg.data.sources], names)
    t = cfg.training
    count = t.max_steps * t.grad_accum * t.batch_size * t.num_workers
    plan = draw_plan([len(train[n]) for n in names], probs, count, t.seed)
    return {"sample_id": np.arange(count, dtype=np.int64),
            "source": np.array([s for s, _ in plan], dtype=np.int32),
            "input_ids": np.stack([train[names[s]][i] for s, i in plan])}


def _train(cfg: DictConfig, dataset, run_dir: Path, vocab_size: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.training
    board_name = f"distill-metrics-{run_dir.name}"
    board = MetricsBoard.options(name=board_name).remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "board": board_name,
                           "vocab_size": vocab_size},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        datasets={"train": dataset},
        run_config=RunConfig(name="train", storage_path=str(run_dir / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=0)),
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_fit(trainer, outcome)), daemon=True)
    thread.start()
    rows = _follow(board, thread, t.max_steps, run_dir / "metrics.jsonl", cfg.run.progress)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], rows


def _fit(trainer, outcome):
    try:
        return trainer.fit()
    except Exception as exc:  # surfaced in the main thread
        outcome["error"] = exc


def _follow(board, thread, max_steps: int, metrics_path: Path, progress: bool):
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=max_steps, desc="distill", unit="step", disable=not progress, dynamic_ncols=True)
    while True:
        alive = thread.is_alive()
        new = ray.get(board.since.remote(len(rows)))
        if new:
            rows.extend(new)
            append_jsonl(metrics_path, new)
            last = new[-1]
            bar.update(last["step"] - bar.n)
            bar.set_postfix(loss=f"{last['loss']:.3f}", ce=f"{last['ce']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
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
    if cfg.teacher.kind == "vllm":
        from distillation.teachers.vllm import VLLMServerTeacher, check_vllm_settings

        check_vllm_settings(cfg.distillation.temperature, qkv_layer, cfg.teacher.signal)
        if cfg.teacher.vllm_url:  # reachable and serving a model, before anything starts
            VLLMServerTeacher(cfg.teacher.vllm_url, cfg.teacher.top_k, 1.0)
    check_cache(cfg, teacher_dir, qkv_layer, vocab_size)
    student = build_student(cfg)
    say(f"teacher {cfg.teacher.model} ({cfg.teacher.kind}); student: BitNet, subln={cfg.student.subln}, "
        f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters")
    run_dir = _run_dir(cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    say(f"run folder: {run_dir}")

    init_ray(cfg)
    train, heldout, heldout_bytes, digests = prepare_data(cfg, str(teacher_dir), tokenizer)
    say("data: " + ", ".join(f"{n} {len(v)} seqs (sha256 {digests[n][:12]})" for n, v in train.items())
        + f"; held-out {len(heldout)} seqs")

    student_before = heldout_loss(student, heldout, heldout_bytes)
    del student
    teacher_eval = None  # a cached teacher's point is not loading the model, so it is not scored here
    if cfg.teacher.kind != "cached":
        teacher_eval = heldout_loss(load_causal_lm(teacher_dir, "float32", cfg.teacher.trust_remote_code),
                                    heldout, heldout_bytes)
    say(f"held-out loss before training: student {student_before['loss']:.3f}"
        + (f", teacher {teacher_eval['loss']:.3f}" if teacher_eval else ""))

    app_name = f"teacher-{run_dir.name}"
    handle = deploy_teacher(cfg, str(teacher_dir), qkv_layer, vocab_size, app_name)
    say(f"teacher pool up: {handle.describe.remote().result()}")
    dataset = training_dataset(sample_rows(cfg, train), app_name, DEPLOYMENT_NAME, cfg.data.teacher_batch_size,
                               cfg.data.teacher_max_attempts)

    try:
        result, rows = _train(cfg, dataset, run_dir, vocab_size)
        teacher_stats = handle.describe.remote().result()
        handle.flush.remote().result()  # write-through answers reach the cache before the pool goes
    finally:
        from ray import serve
        serve.delete(app_name)
    if result.checkpoint is None:
        raise DistillError("training ended without a checkpoint")
    final_dir = _export_student(Path(result.checkpoint.path), run_dir / "student", teacher_dir)
    student_after = heldout_loss(load_student(final_dir), heldout, heldout_bytes)
    if rows:
        plot_losses(rows, run_dir / "loss.png")
    summary = {
        "run_dir": str(run_dir), "student_checkpoint": str(final_dir), "metrics": str(run_dir / "metrics.jsonl"),
        "loss_plot": str(run_dir / "loss.png"), "tokens_seen": rows[-1]["tokens"] if rows else 0,
        "steps": rows[-1]["step"] if rows else 0, "first": rows[0] if rows else {}, "last": rows[-1] if rows else {},
        "heldout": {"student_before": student_before, "student_after": student_after, "teacher": teacher_eval},
        "data_sha256": digests, "teacher": teacher_stats, "wall_s": time.time() - started,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


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
          for k in ("loss", "ce", "logits_kl_weighted", "attention_weighted")),
        "held-out next-token loss (nats/token, bits/byte):",
        f"  student before  {h['student_before']['loss']:.3f}  {h['student_before']['bits_per_byte']:.3f}",
        f"  student after   {h['student_after']['loss']:.3f}  {h['student_after']['bits_per_byte']:.3f}",
        (f"  teacher         {h['teacher']['loss']:.3f}  {h['teacher']['bits_per_byte']:.3f}" if h["teacher"]
         else "  teacher         (cached teacher: not loaded)"),
        f"student checkpoint: {s['student_checkpoint']}",
        f"metrics: {s['metrics']}", f"loss plot: {s['loss_plot']}",
    ]
    print("\n".join(lines), flush=True)
