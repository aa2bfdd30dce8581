"""The driver: one distillation run on a Ray cluster, from config to summary, in four phases.

    preflight  every input check, before Ray starts or a run folder exists (preflight.py)
    prepare    the Ray cluster, the corpus's small sets, held-out losses before training (scored on a
               training worker's resources, training/heldout.py), the run folder
    train      Mixture actor + teacher pool (Ray Serve) + TorchTrainer; Ctrl-C stops after the step
    finish     export, held-out loss after (a strict reload of the final checkpoint's student, on a
               worker's resources), plots and the summary

`run.resume=true` continues a run from its latest checkpoint (and may train it longer).
"""

import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import ray

from distillation.cluster import check_placement, init_ray, peak_rss_mb
from distillation.config import Config, to_yaml
from distillation.config.schema import TeacherConfig
from distillation.console import RayLinesToFile, quiet_ray, say, session_log_dir
from distillation.data.corpus import Corpus, prepare_corpus
from distillation.data.sources import unit_stamps
from distillation.data.steps import samples_per_step, step_of
from distillation.errors import DistillError
from distillation.losses import LOSS_COMPONENTS
from distillation.models import TOKENIZER_FILES, check_output_head, load_causal_lm
from distillation.preflight import STAMPS_FILE, Preflight, preflight
from distillation.roles.export_task import export_formats
from distillation.roles.heldout_task import score_on_worker
from distillation.roles.metrics_board import board_name, start_board
from distillation.roles.mixture import actor_name, start_mixture
from distillation.roles.teacher_replica import app_name, deploy_teacher
from distillation.roles.train_worker import trainer as worker_trainer
from distillation.roles.unit_reader import Readers
from distillation.specs import MixtureSpec, WorkerSpec, replica_spec, student_spec, worker_spec
from distillation.storage import join, read_text, run_storage, train_location, train_storage, upload, write_text
from distillation.student import set_compile
from distillation.training.checkpoint import remove_unregistered
from distillation.training.evaluate import Job, checkpoint_student, starting_student
from distillation.training.metrics import (
    WEIGHTED_TERMS,
    append_jsonl,
    dominance_warning,
    drop_rows_after,
    plot_losses,
    plot_mixture,
    read_jsonl,
)
from distillation.training.plan import influence_steps

INTERRUPTED_EXIT = 130  # what shells report for a process ended by SIGINT


class Interrupted(DistillError):
    """The user stopped the run (Ctrl-C / SIGINT); the message says what was kept and how to resume.
    `at_once`: stopped without waiting for training to end, so Ray Train's fit is still running."""

    exit_code = INTERRUPTED_EXIT

    def __init__(self, message: str, at_once: bool = False):
        super().__init__(message)
        self.at_once = at_once


@dataclass
class Prepared:
    corpus: Corpus
    student_before: dict
    teacher_eval: Optional[dict]
    mixture_stats: Optional[dict] = None  # the Mixture actor's `retained()` at the end of training


def run(cfg: Config, ray_lines: Optional[RayLinesToFile] = None) -> dict:
    """`ray_lines`: the CLI's filter of Ray's terminal output, moved into the run folder once it exists."""
    started = time.time()
    set_compile(cfg.student.compile)
    quiet_ray(cfg.run.verbose)  # before preflight: reading a resumed run's checkpoints logs Ray Train's notices
    pre = preflight(cfg)
    prep = prepare(cfg, pre)
    if ray_lines is not None:
        ray_lines.keep_in(pre.run_dir)
    result, mixture_history, teacher_stats = train(cfg, pre, prep)
    return finish(cfg, pre, prep, result, mixture_history, teacher_stats, started)


# -- prepare ---------------------------------------------------------------------------------------
def prepare(cfg: Config, pre: Preflight) -> Prepared:
    """Ray, the corpus's small sets, the starting student and teacher scored on held-out rows."""
    init_ray(cfg.run)
    if cfg.run.check_placement:
        check_placement(cfg.training, cfg.teacher, pre.uses_teacher)
    readers = Readers(cfg.data.readers, cfg.data.reader_cpus)
    try:
        corpus = prepare_corpus(cfg.data, cfg.influence, pre.teacher.ref, pre.teacher.tokenizer, pre.sources,
                                readers.cut)
    finally:
        readers.close()
    say("data: " + ", ".join(f"{n} {len(s.units)} units (fingerprint {s.fingerprint[:12]})"
                             for n, s in corpus.specs.items())
        + f"; held-out {len(corpus.heldout.rows)} rows; probe {len(corpus.probe.rows)} rows; "
        f"rows {corpus.fill:.0%} real tokens (the units read so far)")
    jobs: List[Job] = [(partial(starting_student, student_spec(cfg, pre.teacher.student_ref), pre.resumed_checkpoint), None)]
    if scores_teacher(cfg.teacher, pre.uses_teacher):
        check = (partial(check_output_head, model_dir=pre.teacher.ref, input_ids=corpus.heldout.rows[:1],
                         vocab_size=pre.teacher.vocab_size) if pre.uses_teacher and cfg.teacher.signal == "hidden"
                 else None)
        jobs.append((partial(load_causal_lm, pre.teacher.ref, "float32", cfg.teacher.trust_remote_code), check))
    student_before, *teacher = score_on_worker(cfg.training, jobs, corpus.heldout, corpus.heldout_bytes,
                                               cfg.run.stall_timeout_s, pre.task)
    teacher_eval = teacher[0] if teacher else None
    say(f"teacher {cfg.teacher.model} ({cfg.teacher.kind}{'' if pre.uses_teacher else ', not needed by this loss'}); "
        f"student: {f'BitNet, subln={cfg.student.subln}' if cfg.student.ternary else 'full precision'}, "
        f"{student_before['parameters'] / 1e6:.1f}M parameters"
        + (f", ternary weights ramped in over {cfg.student.quant_warmup_steps} steps ({cfg.student.quant_warmup_schedule})"
           if cfg.student.quant_warmup_steps else "")
        + (f", resumed at step {pre.resumed['step']}" if pre.resumed else ""))
    if teacher_eval and not math.isfinite(teacher_eval["loss"]):
        raise DistillError(f"teacher {cfg.teacher.model} scores a non-finite held-out loss "
                           f"({teacher_eval['loss']}): its weights or outputs hold NaN/inf; nothing was trained")
    if not student_before["tokens"]:
        say(f"held-out loss before training: none, {NO_HELDOUT}")
    else:
        say(f"held-out loss before training: student {student_before['loss']:.3f}"
            + (f", teacher {teacher_eval['loss']:.3f}" if teacher_eval else ""))
    _make_run_folder(cfg, pre.run_dir, pre.resumed["step"] if pre.resumed else None, pre.sources)
    return Prepared(corpus, student_before, teacher_eval)


def scores_teacher(t: TeacherConfig, uses_teacher: bool) -> bool:
    """Whether the teacher is loaded to score the held-out rows: `teacher.score_heldout`, by default
    when the loss uses it and it is not a cache (a cache's point, like CE-only stage 2's, is not
    loading the model)."""
    return t.score_heldout if t.score_heldout is not None else uses_teacher and t.kind != "cached"


def _make_run_folder(cfg: Config, run_dir: Path, resumed_step: Optional[int], sources: dict) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=cfg.run.resume)
    except OSError as exc:
        raise DistillError(f"cannot create run folder {run_dir}: {exc.strerror}") from None
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    stamps = None if resumed_step is not None else json.dumps({n: unit_stamps(spec) for n, spec in sources.items()})
    if stamps:  # what a refused resume names as changed
        (run_dir / STAMPS_FILE).write_text(stamps)
    shared = run_storage(cfg.run.storage_path, run_dir)
    if shared:  # so a driver whose local folder is gone (a finished job's) can still resume the run
        write_text(join(shared, "config.yaml"), to_yaml(cfg))
        if stamps:
            write_text(join(shared, STAMPS_FILE), stamps)
        for name in ("metrics.jsonl", "ledger.jsonl"):  # a resumed run whose local folder is new
            earlier = read_text(join(shared, name)) if cfg.run.resume and not (run_dir / name).exists() else None
            if earlier:
                (run_dir / name).write_text(earlier)
    for name in ("metrics.jsonl", "ledger.jsonl") if resumed_step is not None else ():
        assert resumed_step is not None  # the loop runs only then
        drop_rows_after(run_dir / name, resumed_step)  # a killed attempt's steps past the checkpoint are redone
    logs = session_log_dir()
    link = run_dir / "ray_logs"
    if link.is_symlink():  # a resumed run: this session's logs, not the last one's
        link.unlink()
    if logs and not link.exists():
        link.symlink_to(logs, target_is_directory=True)  # every Ray process's output, for when it fails
    say(f"run folder: {run_dir}")


# -- train -----------------------------------------------------------------------------------------
def create_mixture(cfg: Config, corpus: Corpus, run_name: str, resume_state: Optional[dict] = None):
    """The named Mixture actor the workers' pipelines draw from (from a checkpoint's state on resume;
    a longer run gets the longer schedule of influence updates)."""
    from distillation.data.mixture import MixturePlan, validate_weights

    t = cfg.training
    names = [s.name for s in cfg.data.sources]
    updates = influence_steps(cfg.influence, t.max_steps)
    if resume_state:  # a longer run: the updates it had, then the longer schedule's after the resume point
        resumed_at = step_of(resume_state["count"], resume_state["samples_per_step"])
        updates = sorted(set(resume_state["update_steps"]) | {u for u in updates if u > resumed_at})
        state = {**resume_state, "update_steps": updates}
    else:
        state = MixturePlan(names, [len(corpus.specs[n].units) for n in names],
                            validate_weights([s.weight for s in cfg.data.sources], names), t.seed,
                            samples_per_step(t.batch_size, t.grad_accum, t.num_workers), updates,
                            cfg.influence.delay_steps, corpus.fingerprints(), cfg.data.shuffle_units).state()
    return start_mixture(run_name, MixtureSpec(state, corpus.specs, corpus.recipe, corpus.pool, cfg.data.readers,
                                                 cfg.data.reader_cpus))


def train(cfg: Config, pre: Preflight, prep: Prepared):
    """(Ray Train result, mixture history, teacher stats); the teacher app and the run's actors are
    removed however it ends."""
    run_dir = pre.run_dir
    teacher_app, teacher_stats, handle = None, None, None
    mixture = create_mixture(cfg, prep.corpus, run_dir.name, pre.resumed["data"] if pre.resumed else None)
    interrupts = _Interrupts()
    try:
        if pre.uses_teacher:
            teacher_app = app_name(run_dir.name)
            try:
                handle = deploy_teacher(replica_spec(cfg, pre.teacher), cfg.teacher, teacher_app)
            except Exception as exc:  # a replica that could not start: its DistillError, as one line
                raise _worker_error(exc) from None
            say(f"teacher pool up: {handle.describe.remote().result()}")
        corpus = prep.corpus
        spec = worker_spec(cfg, pre.teacher, actor_name(run_dir.name), board_name(run_dir.name), teacher_app,
                           corpus.probe, {n: p for n, p in corpus.heldout_by_source.items() if len(p.rows)}, pre.task)
        result = _fit(cfg, run_dir, spec, pre.resumed["step"] if pre.resumed else 0, interrupts, mixture)
        mixture_history = ray.get(mixture.history.remote())
        prep.mixture_stats = ray.get(mixture.retained.remote())
        if handle is not None:
            teacher_stats = handle.describe.remote().result()
            handle.flush.remote().result()  # write-through answers reach the cache before the pool goes
    finally:
        with interrupts:  # counted, not raised: a Ctrl-C that comes late cannot cut the clean-up short
            if teacher_app:
                from ray import serve
                serve.delete(teacher_app)
            ray.kill(mixture)
    return result, mixture_history, teacher_stats


def _fit(cfg: Config, run_dir: Path, spec: WorkerSpec, start_step: int, interrupts: "_Interrupts", mixture):
    """Ray Train's fit in a thread while this one follows the metrics, the ledger, Ctrl-C and the
    mixture's reads (a bad record stops the run)."""
    t = cfg.training
    board = start_board(run_dir.name)
    trainer = worker_trainer(spec, *train_storage(cfg.run.storage_path, run_dir))
    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except Exception as exc:  # surfaced in the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    with interrupts:  # from here until the board is gone, Ctrl-C is counted; `_follow` acts on it
        try:
            thread.start()
            rows = _follow(board, thread, start_step, t.max_steps, run_dir, cfg.run.progress, cfg.run.stall_timeout_s,
                           interrupts, mixture, train_location(cfg.run.storage_path, run_dir))
        finally:
            ray.kill(board)  # named, so it would outlive this run in a driver that goes on (tests, notebooks)
    if "error" in outcome:
        raise _worker_error(outcome["error"])
    step = rows[-1]["step"] if rows else start_step
    if interrupts.count and step < t.max_steps:  # an interrupt during the last step changes nothing
        raise Interrupted(f"interrupted: stopped after step {step} with a checkpoint in {train_location(cfg.run.storage_path, run_dir)}; "
                          f"continue with: distill run.name={run_dir.name} run.output_dir={run_dir.parent} "
                          f"run.resume=true (and the same settings)")
    return outcome["result"]


class BadRecord(DistillError):
    """A record the training data could not read, met after training started (exit 2). `at_once`:
    Ray Train's fit is still running (its workers restart and meet the record again)."""

    at_once = True


class _Interrupts:
    """Counts SIGINTs (the handler only counts: Ray's own signal checks run where it fires); `_follow`
    acts on them: the first asks the workers to stop after the current step, the second stops now."""

    def __init__(self):
        self.count, self.previous = 0, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._count)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _count(self, signum, frame):
        self.count += 1


def _worker_error(exc: Exception) -> Exception:
    """A DistillError raised in a worker or a teacher replica, as one line (Ray wraps it in pages of
    traceback); any other failure as it came, with where the full logs are."""
    text = str(exc)
    marker = "DistillError: "
    if marker in text:
        line = text[text.rindex(marker) + len(marker):].strip().splitlines()[0]
        return DistillError(line)
    logs = session_log_dir()
    if logs:
        say(f"training failed; every Ray process's log is under {logs}")
    return exc


def _follow(board, thread, start_step: int, max_steps: int, run_dir: Path, progress: bool, stall_timeout_s: float,
            interrupts: _Interrupts, mixture, checkpoints: str):
    """Copy the board's metrics and ledger to files as they grow (a killed driver keeps what it saw);
    a run with no finished step for `stall_timeout_s` is an error, not a silent wait; act on Ctrl-C."""
    from tqdm import tqdm

    rows: List[dict] = []  # the metrics rows so far
    task: Dict[str, str] = {}  # the latest task metrics (rows at training.eval_every carry them)
    ledger, last_step, warned, stopping = 0, start_step, False, False
    last_progress = time.monotonic()
    bar = tqdm(total=max_steps, initial=start_step, desc="distill", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        while True:
            if interrupts.count > 1:
                raise Interrupted("interrupted twice: stopped at once; the last checkpoint written, if any, is kept "
                                  "(run.resume=true continues from it)", at_once=True)
            if interrupts.count and not stopping:
                stopping = True
                board.request_stop.remote()
                message = "interrupt: stopping after the current step with a checkpoint (Ctrl-C again to stop at once)"
                bar.write(f"[distill] {message}") if progress else say(message)
            alive = thread.is_alive()
            fresh = ray.get(board.since.remote({"metrics": len(rows), "ledger": ledger}))
            if fresh["ledger"]:
                ledger += len(fresh["ledger"])
                append_jsonl(run_dir / "ledger.jsonl", fresh["ledger"])
                last_progress, last_step = time.monotonic(), max(e["step"] for e in fresh["ledger"])
            elif alive and stall_timeout_s and time.monotonic() - last_progress > stall_timeout_s:
                raise DistillError(
                    f"no optimizer step finished in {stall_timeout_s:.0f} s (last finished: step {last_step}); "
                    f"free cluster resources now: {ray.available_resources()}. The workers' logs ({run_dir / 'ray_logs'}) "
                    f"and the Ray dashboard show where they wait; raise run.stall_timeout_s if a step really takes this long")
            new = fresh["metrics"]
            if new:
                rows.extend(new)
                append_jsonl(run_dir / "metrics.jsonl", new)
                last = new[-1]
                bar.update(last["step"] - bar.n)
                task.update({k.removeprefix("task_"): f"{v:.3f}" for r in new for k, v in r.items() if k.startswith("task_")})
                bar.set_postfix(**{k: f"{last[k]:.3g}" for k in LOSS_COMPONENTS if last.get(k)},
                                tok_s=f"{last['tokens_per_s']:.0f}", wait_s=f"{last['data_wait_s']:.1f}", **task)
                warning = dominance_warning(last)
                if warning and not warned:
                    warned = True
                    message = f"warning at step {last['step']}: {warning}"
                    bar.write(f"[distill] {message}") if progress else say(message)
            bad = ray.get(mixture.failure.remote())
            if bad:  # every worker would meet it again after a restart: stop now, keep the checkpoints
                raise BadRecord(f"{bad}; training stopped after step {last_step}, the checkpoints written so far (if "
                                f"any) are kept under {checkpoints}. Fix or remove the record and start a new run (a "
                                f"resume checks that the files are unchanged)")
            if not alive:
                break
            thread.join(timeout=1.0)
    finally:
        bar.close()
    return rows


# -- finish ----------------------------------------------------------------------------------------
def finish(cfg: Config, pre: Preflight, prep: Prepared, result, mixture_history, teacher_stats,
           started: float) -> dict:
    """Export the trained student, score it on the held-out rows, and write the summary and plots."""
    run_dir = pre.run_dir
    if result.checkpoint is None:
        raise DistillError("training ended without a checkpoint")
    remove_unregistered(train_location(cfg.run.storage_path, run_dir))  # a killed earlier attempt's half-kept checkpoint
    with result.checkpoint.as_directory() as folder:
        final_dir = _export_student(Path(folder), run_dir / "student", pre.teacher.model_dir)
    exports = export_formats(final_dir, run_dir, cfg.student.export)
    student_after, = score_on_worker(cfg.training, [(partial(checkpoint_student, result.checkpoint), None)],
                                     prep.corpus.heldout, prep.corpus.heldout_bytes, cfg.run.stall_timeout_s, pre.task)
    all_rows = read_jsonl(run_dir / "metrics.jsonl")
    if all_rows:
        plot_losses(all_rows, run_dir / "loss.png")
        plot_mixture(mixture_history, [s.name for s in cfg.data.sources], cfg.training.max_steps, run_dir / "mixture.png")
    (run_dir / "mixture.json").write_text(json.dumps(mixture_history, indent=1))
    last = all_rows[-1] if all_rows else {}
    stats = prep.mixture_stats or {}
    summary = {
        "run_dir": str(run_dir), "student_checkpoint": str(final_dir), "exports": exports, "metrics": str(run_dir / "metrics.jsonl"),
        "ledger": str(run_dir / "ledger.jsonl"), "loss_plot": str(run_dir / "loss.png"),
        "tokens_seen": last.get("tokens", 0), "steps": last.get("step", 0),
        "resumed_from_step": pre.resumed["step"] if pre.resumed else 0,
        "first": all_rows[0] if all_rows else {}, "last": last, "mixture": mixture_history,
        "heldout": {"student_before": prep.student_before, "student_after": student_after,
                    "teacher": prep.teacher_eval},
        "warnings": [w for w in [dominance_warning(last)] if w],
        "data": {"fingerprints": prep.corpus.fingerprints(),
                 "units": {n: len(s.units) for n, s in prep.corpus.specs.items()},
                 "units_read": stats.get("units_read"), "fill_ratio": stats.get("fill_ratio")},
        "peak_rss_mb": {"driver": peak_rss_mb(), "mixture": stats.get("peak_rss_mb")},
        "teacher": teacher_stats, "wall_s": time.time() - started,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    shared = run_storage(cfg.run.storage_path, run_dir)
    if shared:  # the durable copy: a job's working folder, say, is cleaned up after the job
        upload(run_dir, shared, skip=("ray", "ray_logs"))
        summary["storage"] = shared
    print_summary(summary)
    return summary


def _export_student(checkpoint_dir: Path, out: Path, tokenizer_dir: Path) -> Path:
    """Copy the final student next to the run, atomically, with the tokenizer so it stands alone."""
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint_dir / "student", staging)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, staging / name)
    shutil.copy2(checkpoint_dir / "config.yaml", staging / "distill_config.yaml")
    if out.exists():  # a resumed run's earlier export
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


NO_HELDOUT = "no held-out rows (the sources gave none at data.heldout_fraction: add text or raise it)"


def _scored(result: dict) -> str:
    """'nats/token  bits/byte' of a held-out score, or why there is none (never zeros that read as losses)."""
    if not result["tokens"]:
        return f"n/a, {NO_HELDOUT}"
    return f"{result['loss']:.3f}  {result['bits_per_byte']:.3f}"


def _task_lines(h: dict) -> List[str]:
    """The task's metrics for the student before and after, and the teacher, where scored."""
    if "task" not in h["student_before"]:
        return []
    rows = [(who, h[key]["task"]) for who, key in (("student before", "student_before"), ("student after", "student_after"),
                                                    ("teacher", "teacher")) if h[key] and "task" in h[key]]
    names = [k for k in rows[0][1] if k != "examples"]
    return [f"task metrics on {int(rows[0][1]['examples'])} held-out records ({', '.join(names)}):",
            *(f"  {who:<15} " + "  ".join(f"{m[k]:.3f}" for k in names) for who, m in rows)]


def print_summary(s: dict) -> None:
    h = s["heldout"]
    first, last = s["first"], s["last"]
    lines = [
        "", "=== distillation summary ===",
        f"steps {s['steps']}, tokens seen {s['tokens_seen']:,}, wall time {s['wall_s']:.0f} s"
        + (f" (resumed from step {s['resumed_from_step']})" if s["resumed_from_step"] else ""),
        "loss components (first -> last logged step):",
        *(f"  {k:<20} {first.get(k, 0):10.4f} -> {last.get(k, 0):10.4f}"
          for k in ("loss", *(key for key, _ in WEIGHTED_TERMS))),
        "held-out next-token loss (nats/token, bits/byte):",
        f"  student before  {_scored(h['student_before'])}",
        f"  student after   {_scored(h['student_after'])}",
        f"  teacher         {_scored(h['teacher']) if h['teacher'] else '(not loaded; teacher.score_heldout=true scores it)'}",
        *_task_lines(h),
        "mixture weights (start -> end): " + ", ".join(
            f"{a:.2f} -> {b:.2f}" for a, b in zip(s["mixture"][0]["weights"], s["mixture"][-1]["weights"])),
        *(f"warning: {w}" for w in s["warnings"]),
        f"student checkpoint: {s['student_checkpoint']}"
        + (f" (and under {s['storage']}, with checkpoints and logs)" if s.get("storage") else ""),
        *(f"student export ({fmt}): {path}" for fmt, path in s.get("exports", {}).items() if fmt != "hf"),
        f"metrics: {s['metrics']}", f"loss plot: {s['loss_plot']}",
    ]
    print("\n".join(lines), flush=True)
