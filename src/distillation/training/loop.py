"""The student side of BitDistill on one Ray Train worker, as named phases (roles/train_worker.py
runs them in order).

    setup            the student (fresh or from the latest checkpoint), optimizer, data stream
    micro_step       forward + loss + backward of one micro-batch (training/step.py)
    optimizer_step   clip, step (or skip a non-finite one), influence update, ledger
    log              one metrics row per `log_every` steps, with held-out losses every `eval_every`
    save_checkpoint  a full training checkpoint every `checkpoint_every` steps, at the end, and when
                     the driver asks the run to stop (a first Ctrl-C)

Each worker streams its own fixed slice of the run's samples (data.pipeline.rank_sample_ids).
`max_steps` counts optimizer updates, not micro-batches. Restarted by Ray Train after a failure, or
by a resumed driver, a worker continues from the latest checkpoint exactly.
"""

import shutil
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import List, Optional

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from distillation.config.schema import TrainingConfig
from distillation.data.packing import Packed
from distillation.data.pipeline import read_batches
from distillation.data.steps import samples_before, samples_per_step
from distillation.losses import LossWeights, OutputHead
from distillation.models import capture_qkv, load_output_head
from distillation.specs import WorkerSpec
from distillation.student import build_student, set_compile, set_quant_mix
from distillation.training.checkpoint import load_training_checkpoint, save_training_checkpoint, saved_optimizer_state
from distillation.training.evaluate import heldout_loss
from distillation.training.influence import alignment_scores, move_weights, smooth
from distillation.training.metrics import LogWindow, TrainingGauges
from distillation.training.parallel import (
    check_same_weights,
    distribute,
    gradient_sync,
    is_sharded,
    load_optimizer_state,
    optimizer_state,
    unwrapped,
    whole_student_state,
)
from distillation.training.plan import influence_steps, loss_weights
from distillation.training.step import NanGuard, labels_per_micro_batch, lr_lambda, micro_step


@dataclass
class Worker:
    """Everything one worker holds for the run (built by `setup`)."""

    spec: WorkerSpec
    rank: int
    world: int
    model: torch.nn.Module  # as trained: DDP-wrapped (world > 1), or sharded in place (training/parallel.py)
    core: torch.nn.Module  # the student itself
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    guard: NanGuard
    weights: LossWeights
    head: Optional[OutputHead]  # the teacher's frozen output head, for its hidden-state signal
    step: int
    tokens: int
    mixture: "ray.actor.ActorHandle"
    board: Optional["ray.actor.ActorHandle"]
    gauges: Optional[TrainingGauges]
    update_steps: set

    @property
    def sharded(self) -> bool:  # FSDP: every forward (evaluation, influence) needs every rank
        return is_sharded(self.core)


def autocast_dtype(t: TrainingConfig) -> Optional[torch.dtype]:
    """The forward pass's compute dtype under `training.autocast` (None: no autocast, fp32)."""
    return torch.bfloat16 if t.autocast == "bf16" else None


def setup(spec: WorkerSpec) -> Worker:
    """This worker's student (resumed from the latest checkpoint if there is one), optimizer, schedule,
    device and counters: everything the steps that follow need."""
    t = spec.training
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(t.num_threads)
    torch.set_flush_denormal(True)
    set_compile(spec.compile)
    torch.manual_seed(t.seed + rank)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            student, state, optimizer_tensors = load_training_checkpoint(folder)
    else:
        student, state, optimizer_tensors = build_student(spec.student), {"step": 0, "tokens": 0, "nan_skipped": 0}, None
    device = ray.train.torch.get_device()
    if t.activation_checkpointing:  # non-reentrant: the Q/K/V hooks' tensors keep their gradient path
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = distribute(student, t.parallelism, device)
    core = unwrapped(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
    if optimizer_tensors is not None:
        load_optimizer_state(core, optimizer, saved_optimizer_state(state, optimizer_tensors))
        scheduler.load_state_dict(state["scheduler"])
    weights = loss_weights(spec.distillation)
    head = None
    if spec.signal == "hidden" and weights.logits_weight > 0:
        head = load_output_head(spec.teacher_model, spec.vocab_size, spec.trust_remote_code).to(
            device, autocast_dtype(t))  # the matmul in the compute dtype
    return Worker(spec=spec, rank=rank, world=world, model=model, core=core, device=device, optimizer=optimizer,
                  scheduler=scheduler, guard=NanGuard(t.max_nan_steps, state["nan_skipped"]), weights=weights,
                  head=head, step=state["step"], tokens=state["tokens"], mixture=ray.get_actor(spec.feed.mixture),
                  board=ray.get_actor(spec.board) if spec.board else None,
                  gauges=TrainingGauges(spec.sources) if rank == 0 else None,
                  update_steps=set(influence_steps(spec.influence, t.max_steps)))


def influence_update(w: Worker) -> None:
    """Score every source against the probe set and (rank 0) send the moved weights to the mixture.
    Rank 0 alone under DDP; every rank under FSDP, on the same rows (the batches are seeded by step)."""
    icfg = w.spec.influence
    names = w.spec.sources
    batches = ray.get(w.mixture.influence_batches.remote(w.step, icfg.batch_size))

    def as_tensors(packed: Packed):
        columns = (packed.rows, packed.lengths, packed.positions, packed.labelled)
        return tuple(None if x is None else torch.as_tensor(x).long().to(w.device) for x in columns)

    scores = alignment_scores(w.core, as_tensors(w.spec.probe), {n: as_tensors(batches[n]) for n in names})
    if w.rank != 0:
        return
    latest = max(ray.get(w.mixture.history.remote()), key=lambda e: e["computed_at"] or -1)
    smoothed = smooth(latest["scores"], [scores[n] for n in names], icfg.smoothing)
    weights = move_weights(latest["weights"], smoothed, icfg.eta, icfg.floor)
    ray.get(w.mixture.set_weights.remote(w.step, weights.tolist(), smoothed.tolist()))


def optimizer_step(w: Worker, ledger: list) -> float:
    """Clip and step (NaN guard), then what follows a step: influence update, ledger."""
    grad_norm = w.guard.step(w.model, w.optimizer, w.scheduler, w.spec.training.grad_clip)
    w.step += 1
    if w.step in w.update_steps and (w.rank == 0 or w.sharded):
        influence_update(w)
    if w.board is not None:
        w.board.push_ledger.remote(w.rank, w.step, ledger)
    return grad_norm


def log(w: Worker, window: LogWindow, grad_norm: float, final: bool) -> None:
    """Rank 0: one metrics row (gauges, board) when this step is due; the window then starts afresh.
    Held-out losses are computed on rank 0, or under FSDP on every rank (each forward is collective)."""
    t = w.spec.training
    evaluate = bool(t.eval_every) and (w.step % t.eval_every == 0 or final)
    logs = w.rank == 0 and (w.step % t.log_every == 0 or final or evaluate)
    if logs:
        row = window.row(w.spec.distillation, step=w.step, tokens=w.tokens, lr=w.scheduler.get_last_lr()[0],
                         grad_norm=grad_norm, nan_skipped=w.guard.skipped,
                         quant_mix=w.spec.student.ramp.mix(w.step - 1))  # timed before evaluation
    if evaluate and (w.rank == 0 or w.sharded):
        losses = {f"eval_{name}": heldout_loss(w.core, rows, 0)["loss"] for name, rows in w.spec.eval.items()}
        if w.spec.task is not None:  # the task's metrics, on the same schedule
            losses.update({f"task_{k}": v for k, v in w.spec.task.score(w.core).items() if k != "examples"})
        w.model.train()
    if not logs:
        return
    if evaluate:
        row.update(losses)
    row["mixture"] = ray.get(w.mixture.weights_at.remote(w.step - 1)).tolist()  # in force for this step
    assert w.gauges is not None  # `logs` only on rank 0, which holds them
    w.gauges.set(row)
    if w.board is not None:
        w.board.push.remote(row)
    window.reset()  # evaluation is not training time


def save_checkpoint(w: Worker) -> None:
    """Every rank reports; rank 0 writes the folder (Ray Train persists it, then registers it)."""
    if not w.sharded:  # under DDP gradients are all-reduced and the same steps taken: one student
        check_same_weights(w.core, w.device, f"at step {w.step}; their gradients did not agree")
    model_state = whole_student_state(w.core)  # collective under FSDP: every rank takes part
    optimizer_whole = optimizer_state(w.core, w.optimizer)
    saved, folder = None, None
    if w.rank == 0:
        t = w.spec.training
        consumed = samples_before(w.step, samples_per_step(t.batch_size, t.grad_accum, w.world))
        data_state = ray.get(w.mixture.state_at.remote(consumed))
        folder = save_training_checkpoint(w.core, optimizer_whole, w.scheduler, w.spec.config_yaml, {
            "step": w.step, "tokens": w.tokens, "nan_skipped": w.guard.skipped, "data": data_state},
            model_state=model_state)
        saved = ray.train.Checkpoint.from_directory(str(folder))
    ray.train.report({"step": w.step, "tokens": w.tokens}, checkpoint=saved)
    if folder is not None:  # persisted to the run's storage by now: the local staging copy can go
        shutil.rmtree(folder, ignore_errors=True)


def stop_requested(w: Worker) -> bool:
    """Whether the driver asked the run to stop, agreed by all ranks: rank 0 asks the board, and the
    answer is broadcast, so no rank leaves a step its peers still all-reduce in."""
    asked = w.rank == 0 and w.board is not None and ray.get(w.board.stop_requested.remote())
    if w.world == 1 or not dist.is_initialized():
        return bool(asked)
    flag = torch.tensor([1 if asked else 0], device=w.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def step_batches(batches, grad_accum: int):
    """The trainer's micro-batches grouped by optimizer step (`grad_accum` each)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []


def train_steps(w: Worker, stream) -> None:
    """For each optimizer step its micro-steps over `stream` (this rank's teacher-annotated rows),
    the optimizer step, the logging window and, on schedule, a checkpoint. A step's micro-batches
    are read first: the loss divides by the step's labelled tokens on every rank."""
    t = w.spec.training
    dtype = autocast_dtype(t)
    autocast = partial(torch.autocast, w.device.type, dtype=dtype) if dtype else nullcontext
    window = LogWindow()
    with ExitStack() as hooks:
        student_qkv = (hooks.enter_context(capture_qkv(w.core, w.spec.distillation.student_layer))
                       if w.weights.uses_attention else None)
        w.model.train()
        waited_since = time.perf_counter()
        for batches in step_batches(read_batches(stream, t.batch_size, w.device), t.grad_accum):
            data_wait_s = time.perf_counter() - waited_since
            n_labels = labels_per_micro_batch(batches, w.world)
            if w.step <= w.spec.student.ramp.steps:  # the warm-up (its last call sets 1, which then stays)
                set_quant_mix(w.core, w.spec.student.ramp.mix(w.step))  # a function of the step: resumes exactly
            ledger: List[tuple] = []  # (sample_id, source, unit, row) of the rows of this step
            for micro, batch in enumerate(batches):
                ledger.extend(zip(*(batch[c].tolist() for c in ("sample_id", "source", "unit", "row"))))
                with gradient_sync(w.model, micro == len(batches) - 1):  # only a step's last micro-batch reduces
                    out = micro_step(w.model, batch, w.weights, w.spec.vocab_size, w.head, student_qkv, autocast,
                                     grad_scale=1.0 / t.grad_accum, n_labels=n_labels)
                real = int(batch["length"].sum()) * w.world
                w.tokens += real
                window.add(out.as_floats(), real, data_wait_s if micro == 0 else 0.0)
            grad_norm = optimizer_step(w, ledger)
            done = w.step >= t.max_steps
            stop = not done and stop_requested(w)
            log(w, window, grad_norm, final=done or stop)
            if done or stop or (t.checkpoint_every and w.step % t.checkpoint_every == 0):
                save_checkpoint(w)
            if done or stop:
                break
            waited_since = time.perf_counter()
