"""One training step of the student, in pieces a test can call without Ray: the teacher's columns as
loss targets, one micro-step (forward, loss, backward), and the optimizer step with its NaN guard."""

import math
from contextlib import nullcontext
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from distillation.config.schema import TrainingConfig
from distillation.data.packing import next_token_labels, segment_ids, token_mask
from distillation.errors import DistillError
from distillation.losses import (
    IGNORE_INDEX,
    QKV,
    HeadInputs,
    HiddenTargets,
    LossOutput,
    LossWeights,
    OutputHead,
    SampledTargets,
    SparseTargets,
    Targets,
    bitdistill_loss,
)
from distillation.models import forward_rows, output_head_skipped, plain_output_head
from distillation.teachers.schema import PREFIX
from distillation.training.parallel import is_sharded, unwrapped


def targets_from_columns(batch: Mapping, head: Optional[OutputHead] = None) -> Optional[Targets]:
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


def batch_labels(batch: Mapping) -> tuple:
    """(input_ids, lengths, positions or None, labels) of a trainer batch: positions for packed rows
    (data.pack_documents), labels only on responses where rows carry `labelled` (records)."""
    input_ids, lengths = batch["input_ids"].long(), batch["length"].long()
    positions = batch["positions"].long() if "positions" in batch else None
    return input_ids, lengths, positions, next_token_labels(input_ids, lengths, positions, batch.get("labelled"))


def labels_per_micro_batch(batches: Sequence[Mapping], world: int) -> float:
    """The labelled tokens of a whole optimizer step (its micro-batches `batches` on every rank)
    per micro-batch: what CE and L_LD divide by, so every token of the step weighs the same. With
    labels on responses only their count differs between micro-batches and ranks, and a mean per
    micro-batch would weigh a token of a short response more (torchtune normalises the same way)."""
    count = torch.tensor([float(sum(int((batch_labels(b)[3] != IGNORE_INDEX).sum()) for b in batches))],
                         dtype=torch.float64, device=batches[0]["input_ids"].device)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(count)
    return count.item() / (len(batches) * world)


def micro_step(model, batch: Mapping, weights: LossWeights, vocab_size: int, head: Optional[OutputHead] = None,
               student_qkv: Optional[Mapping] = None, autocast: Callable = nullcontext,
               grad_scale: float = 1.0, n_labels: Optional[float] = None) -> LossOutput:
    """Forward, loss and backward of one micro-batch; gradients accumulate (scaled by `grad_scale`,
    1 / grad_accum). `student_qkv` is the dict `models.capture_qkv` fills during the forward pass;
    `n_labels` is `labels_per_micro_batch` of the step (default: this batch's own labels)."""
    input_ids, lengths, positions, labels = batch_labels(batch)
    teacher_qkv = {key: batch[PREFIX + key] for key in QKV} if weights.uses_attention else None
    student_head = fused_output_head(model)
    device = input_ids.device.type
    with autocast(), output_head_skipped(student_head):
        out = forward_rows(model, input_ids, positions).logits  # hidden states where the head is skipped
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else out.dtype
    student = (HeadInputs(out, student_head.weight, student_head.bias, vocab_size, dtype) if student_head is not None
               else out[..., :vocab_size])  # the shared real range (vocab.py)
    del out
    targets = targets_from_columns(batch, head) if weights.logits_weight > 0 else None
    loss = bitdistill_loss(student, labels, weights, targets, teacher_qkv, student_qkv,
                           mask=token_mask(lengths, input_ids.shape[1]),
                           segments=None if positions is None else segment_ids(positions), n_labels=n_labels,
                           dtype=dtype)
    del student  # the chunked loss keeps only its gradient buffers
    (loss.total * grad_scale).backward()
    return loss


def fused_output_head(model) -> Optional[torch.nn.Linear]:
    """The student's head that the loss applies itself (`losses.HeadInputs`), so its logits exist one
    chunk at a time; None where the loss takes logits: a head that is not a plain matmul, or a sharded
    (FSDP) student, whose head weight outside the forward pass is this rank's shard only."""
    return None if is_sharded(model) else plain_output_head(unwrapped(model))


def lr_lambda(tcfg: TrainingConfig) -> Callable[[int], float]:
    """Linear warmup from lr / warmup_steps, then a cosine down to `min_lr_ratio`. Our own rather than
    transformers' `get_cosine_with_min_lr_schedule_with_warmup`, whose warmup starts at lr 0 and so
    wastes the first optimizer step (3% of the 30-step default job)."""
    def factor(step: int) -> float:
        if step < tcfg.warmup_steps:
            return (step + 1) / tcfg.warmup_steps
        progress = (step - tcfg.warmup_steps) / max(1, tcfg.max_steps - tcfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * cosine
    return factor


class NanGuard:
    """Counts optimizer steps skipped for a non-finite gradient norm; too many stop the run."""

    def __init__(self, max_skips: int, skipped: int = 0):
        self.max_skips, self.skipped = max_skips, skipped

    def step(self, model, optimizer, scheduler, clip: float) -> float:
        """Clip and step, or skip the update if the gradient is not finite. Returns the norm.

        Under DDP the gradients are already all-reduced here; under FSDP the norm of the sharded
        gradients is reduced across ranks by clip_grad_norm_: either way every rank sees the same norm
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
