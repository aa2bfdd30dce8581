"""`train_loop_per_worker`: the student side of BitDistill on Ray Train.

Each worker streams its own fixed slice of the run's samples (data.pipeline.rank_sample_ids),
computes CE + lambda * L_LD + gamma * L_AD, steps AdamW with warmup + cosine, and reports metrics and
the sample ledger. `max_steps` counts optimizer updates, not micro-batches. Every
`checkpoint_every` steps it writes a full training checkpoint (training.checkpoint) and, restarted
by Ray Train after a failure or by a resumed driver, continues from the latest one exactly.
"""

import dataclasses
import math
import time
from contextlib import nullcontext

import ray
import ray.train
import ray.train.torch
import torch
from omegaconf import OmegaConf

from distillation.data.influence import alignment_scores, move_weights, smooth
from distillation.data.packing import Packed, next_token_labels, token_mask
from distillation.data.pipeline import rank_sample_ids, read_batches, worker_stream
from distillation.errors import DistillError
from distillation.losses import HiddenTargets, LossWeights, SampledTargets, SparseTargets, bitdistill_loss
from distillation.models import capture_qkv, load_output_head
from distillation.teachers.deployment import DEPLOYMENT_NAME
from distillation.teachers.schema import PREFIX, QKV
from distillation.training.evaluate import heldout_loss
from distillation.training.checkpoint import load_training_checkpoint, restore_optimizer, save_training_checkpoint
from distillation.training.metrics import TrainingGauges
from distillation.training.student_init import build_student, set_compile


def loss_weights(dcfg) -> LossWeights:
    """The loss's settings straight from `distillation.*` (the schema holds the defaults)."""
    return LossWeights(**{f.name: dcfg[f.name] for f in dataclasses.fields(LossWeights)})


def needs_teacher(dcfg) -> bool:
    return dcfg.logits_weight > 0 or dcfg.attention_weight > 0


def targets_from_columns(batch: dict, head=None):
    """The teacher columns of a batch as the loss's target type (whichever signal the teacher sent);
    hidden states need `head`, the worker's frozen copy of the teacher's output head."""
    if PREFIX + "hidden" in batch:
        if head is None:
            raise DistillError("the teacher sent hidden states but this worker holds no teacher output head")
        return HiddenTargets(hidden=batch[PREFIX + "hidden"], head=head)
    if PREFIX + "temperature" not in batch:
        return None
    temperature = float(batch[PREFIX + "temperature"][0])
    if PREFIX + "sampled_ids" in batch:
        return SampledTargets(ids=batch[PREFIX + "sampled_ids"], weights=batch[PREFIX + "sampled_weights"],
                              logprobs=batch[PREFIX + "sampled_logprobs"], temperature=temperature)
    return SparseTargets(ids=batch[PREFIX + "topk_ids"], logprobs=batch[PREFIX + "topk_logprobs"],
                         tail_mass=batch[PREFIX + "tail_mass"], temperature=temperature)


def lr_lambda(tcfg):
    def factor(step: int) -> float:
        if step < tcfg.warmup_steps:
            return (step + 1) / tcfg.warmup_steps
        progress = (step - tcfg.warmup_steps) / max(1, tcfg.max_steps - tcfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * cosine
    return factor


def influence_steps(icfg, max_steps: int) -> list:
    """Optimizer steps after which influence moves the mixture weights (only those whose update
    takes effect before the run ends)."""
    if not icfg.enabled:
        return []
    return list(range(icfg.update_interval, max_steps - icfg.delay_steps, icfg.update_interval))


class NanGuard:
    """Counts optimizer steps skipped for a non-finite gradient norm; too many stop the run."""

    def __init__(self, max_skips: int, skipped: int = 0):
        self.max_skips, self.skipped = max_skips, skipped

    def step(self, model, optimizer, scheduler, clip: float) -> float:
        """Clip and step, or skip the update if the gradient is not finite. Returns the norm.

        Under DDP the gradients are already all-reduced here, so every rank sees the same norm
        and skips together."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        if math.isfinite(norm):
            optimizer.step()
        else:
            self.skipped += 1
            if self.skipped > self.max_skips:
                raise DistillError(f"{self.skipped} optimizer steps had a non-finite loss or gradient "
                                   f"(training.max_nan_steps={self.max_skips}); stopping")
        scheduler.step()  # the schedule follows steps taken or skipped, so it stays aligned with the data
        optimizer.zero_grad(set_to_none=True)
        return norm


def influence_update(core, step: int, cfg, mixture, probe: tuple) -> None:
    """Score every source against the probe set and send the moved weights to the mixture."""
    icfg = cfg.influence
    names = [s.name for s in cfg.data.sources]
    batches = ray.get(mixture.influence_batches.remote(step, icfg.batch_size))
    as_tensors = lambda b: (torch.as_tensor(b[0]).long(), torch.as_tensor(b[1]).long())
    scores = alignment_scores(core, as_tensors(probe), {n: as_tensors(batches[n]) for n in names})
    latest = max(ray.get(mixture.history.remote()), key=lambda e: e["computed_at"] or -1)
    smoothed = smooth(latest["scores"], [scores[n] for n in names], icfg.smoothing)
    weights = move_weights(latest["weights"], smoothed, icfg.eta, icfg.floor)
    ray.get(mixture.set_weights.remote(step, weights.tolist(), smoothed.tolist()))


def train_loop_per_worker(config: dict) -> None:
    cfg = OmegaConf.create(config["cfg"])
    tcfg, dcfg = cfg.training, cfg.distillation
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(tcfg.num_threads)
    torch.set_flush_denormal(True)
    set_compile(cfg.student.compile)
    torch.manual_seed(tcfg.seed + rank)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            model, state, optimizer_tensors = load_training_checkpoint(folder)
    else:
        model, state, optimizer_tensors = build_student(cfg), {"step": 0, "tokens": 0, "nan_skipped": 0}, None
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    device = ray.train.torch.get_device()
    weights = loss_weights(dcfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(0.9, 0.95), weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))
    if optimizer_tensors is not None:
        restore_optimizer(optimizer, scheduler, state, optimizer_tensors)
    guard = NanGuard(tcfg.max_nan_steps, state["nan_skipped"])
    board = ray.get_actor(config["board"]) if config.get("board") else None
    mixture = ray.get_actor(config["mixture"])
    gauges = TrainingGauges([s.name for s in cfg.data.sources]) if rank == 0 else None
    update_steps = set(influence_steps(cfg.influence, tcfg.max_steps))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if tcfg.autocast == "bf16" else nullcontext())

    step, tokens = state["step"], state["tokens"]
    rows_per_step = tcfg.batch_size * tcfg.grad_accum  # on this rank
    samples_per_step = rows_per_step * world
    ids = rank_sample_ids(rank, world, tcfg.batch_size, tcfg.grad_accum, step, tcfg.max_steps)
    stream = worker_stream(ids, rows_per_step, config["mixture"], config["app_name"],
                           DEPLOYMENT_NAME, cfg.data.teacher_batch_size, cfg.data.teacher_max_in_flight,
                           cfg.data.teacher_max_attempts)
    vocab_size = config["vocab_size"]
    head = None  # the teacher's output head, frozen, for its hidden-state signal
    if cfg.teacher.signal == "hidden" and weights.logits_weight > 0:
        head = load_output_head(config["teacher_dir"], vocab_size, cfg.teacher.trust_remote_code).to(device)
    micro = 0
    window = {"loss": 0.0, "ce": 0.0, "logits_kl": 0.0, "attention": 0.0, "n": 0, "data_wait_s": 0.0}
    ledger = []
    last = window_start = time.perf_counter()
    window_tokens = 0
    qkv_ctx = capture_qkv(core, dcfg.student_layer) if weights.uses_attention else None
    student_qkv = qkv_ctx.__enter__() if qkv_ctx else None
    try:
        model.train()
        for batch in read_batches(stream, tcfg.batch_size, device):
            window["data_wait_s"] += time.perf_counter() - last
            input_ids, lengths = batch["input_ids"].long(), batch["length"].long()
            labels = next_token_labels(input_ids, lengths)
            teacher_qkv = {k: batch[PREFIX + k] for k in QKV} if weights.uses_attention else None
            ledger.extend(zip(batch["sample_id"].tolist(), batch["source"].tolist(), batch["row"].tolist()))
            sync = (micro + 1) % tcfg.grad_accum == 0
            # DDP all-reduces on every backward unless told not to: only the last micro-batch syncs.
            with (nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()):
                with autocast:
                    logits = model(input_ids=input_ids).logits[..., :vocab_size]  # shared real range (vocab.py)
                out = bitdistill_loss(logits, labels, weights, targets_from_columns(batch, head), teacher_qkv, student_qkv,
                                      mask=token_mask(lengths, input_ids.shape[1]))
                del logits  # the chunked loss keeps only its gradient buffer
                (out.total / tcfg.grad_accum).backward()
            for key, value in out.as_floats().items():
                window[key] += value
            window["n"] += 1
            micro += 1
            real = int(lengths.sum()) * world
            tokens += real
            window_tokens += real
            if not sync:
                last = time.perf_counter()
                continue
            grad_norm = guard.step(model, optimizer, scheduler, tcfg.grad_clip)
            step += 1
            done = step >= tcfg.max_steps
            if rank == 0 and step in update_steps:
                influence_update(core, step, cfg, mixture, config["probe"])
            if board is not None:
                board.push_ledger.remote(rank, step, ledger)
            ledger = []
            evaluate = rank == 0 and tcfg.eval_every and (step % tcfg.eval_every == 0 or done)
            if rank == 0 and (step % tcfg.log_every == 0 or done or evaluate):
                now = time.perf_counter()
                scores = {f"eval_{name}": heldout_loss(core, Packed(*rows, 0), 0)["loss"]
                          for name, rows in config["eval"].items()} if evaluate else {}
                model.train()
                n = window["n"]
                row = {"step": step, "tokens": tokens, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens_per_s": window_tokens / (now - window_start), "data_wait_s": window["data_wait_s"],
                       "nan_skipped": guard.skipped, **scores,
                       **{k: window[k] / n for k in ("loss", "ce", "logits_kl", "attention")}}
                row["ce_weighted"] = dcfg.ce_weight * row["ce"]
                row["logits_kl_weighted"] = dcfg.logits_weight * row["logits_kl"]
                row["attention_weighted"] = dcfg.attention_weight * row["attention"]
                row["mixture"] = ray.get(mixture.weights_at.remote(step - 1)).tolist()  # in force for this step
                gauges.set(row)
                if board is not None:
                    board.push.remote(row)
                window = {k: 0.0 for k in window} | {"n": 0}
                window_start, window_tokens = time.perf_counter(), 0  # evaluation is not training time
            if done or (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0):
                saved = None
                if rank == 0:
                    data_state = ray.get(mixture.state_at.remote(step * samples_per_step))
                    folder = save_training_checkpoint(core, optimizer, scheduler, cfg, {
                        "step": step, "tokens": tokens, "nan_skipped": guard.skipped, "data": data_state})
                    saved = ray.train.Checkpoint.from_directory(str(folder))
                ray.train.report({"step": step, "tokens": tokens}, checkpoint=saved)
            if done:
                break
            last = time.perf_counter()
    finally:
        if qkv_ctx:
            qkv_ctx.__exit__(None, None, None)
