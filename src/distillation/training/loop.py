"""`train_loop_per_worker`: the student side of BitDistill on Ray Train.

Reads its shard of the teacher-annotated dataset, computes CE + lambda * L_LD + gamma * L_AD,
steps AdamW with warmup + cosine, reports metrics, and checkpoints the student in transformers
format. `max_steps` counts optimizer updates, not micro-batches.
"""

import json
import math
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from omegaconf import OmegaConf

from distillation.data.packing import next_token_labels
from distillation.losses import LossWeights, SampledTargets, SparseTargets, bitdistill_loss
from distillation.models import capture_qkv
from distillation.student import save_student
from distillation.teachers.schema import PREFIX, QKV
from distillation.training.student_init import build_student, set_compile


def loss_weights(dcfg) -> LossWeights:
    return LossWeights(ce_weight=dcfg.ce_weight, logits_weight=dcfg.logits_weight,
                       attention_weight=dcfg.attention_weight, temperature=dcfg.temperature,
                       temperature_squared=dcfg.temperature_squared, split_heads=dcfg.split_heads,
                       attention_temperature=dcfg.attention_temperature, chunk_tokens=dcfg.chunk_tokens)


def targets_from_columns(batch: dict):
    """The teacher columns of a batch as the loss's target type (whichever signal the teacher sent)."""
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


def _save_checkpoint(model, cfg, state: dict) -> ray.train.Checkpoint:
    folder = Path(tempfile.mkdtemp(prefix="distill-ckpt-"))
    save_student(model, folder / "student")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "train_state.json").write_text(json.dumps(state))
    return ray.train.Checkpoint.from_directory(str(folder))


def train_loop_per_worker(config: dict) -> None:
    cfg = OmegaConf.create(config["cfg"])
    tcfg, dcfg = cfg.training, cfg.distillation
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(tcfg.num_threads)
    torch.set_flush_denormal(True)
    set_compile(cfg.student.compile)
    torch.manual_seed(tcfg.seed + rank)

    model = build_student(cfg)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    device = ray.train.torch.get_device()
    weights = loss_weights(dcfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(0.9, 0.95), weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))
    board = ray.get_actor(config["board"]) if rank == 0 and config.get("board") else None

    vocab_size = config["vocab_size"]
    shard = ray.train.get_dataset_shard("train")
    step, micro, tokens = 0, 0, 0
    window = {"loss": 0.0, "ce": 0.0, "logits_kl": 0.0, "attention": 0.0, "n": 0, "data_wait_s": 0.0}
    last = time.perf_counter()
    window_start, window_tokens = last, 0
    qkv_ctx = capture_qkv(core, dcfg.student_layer) if weights.uses_attention else None
    student_qkv = qkv_ctx.__enter__() if qkv_ctx else None
    try:
        model.train()
        for batch in shard.iter_torch_batches(batch_size=tcfg.batch_size, device=device, drop_last=True):
            window["data_wait_s"] += time.perf_counter() - last
            input_ids = batch["input_ids"].long()
            labels = next_token_labels(input_ids)
            targets = targets_from_columns(batch)
            teacher_qkv = {k: batch[PREFIX + k] for k in QKV} if weights.uses_attention else None
            logits = model(input_ids=input_ids).logits[..., :vocab_size]  # shared real range (vocab.py)
            out = bitdistill_loss(logits, labels, weights, targets, teacher_qkv, student_qkv)
            del logits  # the chunked loss keeps only its gradient buffer
            (out.total / tcfg.grad_accum).backward()
            for key, value in out.as_floats().items():
                window[key] += value
            window["n"] += 1
            micro += 1
            tokens += input_ids.numel() * context.get_world_size()
            window_tokens += input_ids.numel() * context.get_world_size()
            if micro % tcfg.grad_accum:
                last = time.perf_counter()
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip).item()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            done = step >= tcfg.max_steps
            if step % tcfg.log_every == 0 or done:
                now = time.perf_counter()
                n = window["n"]
                row = {"step": step, "tokens": tokens, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens_per_s": window_tokens / (now - window_start),
                       "data_wait_s": window["data_wait_s"],
                       **{k: window[k] / n for k in ("loss", "ce", "logits_kl", "attention")}}
                row["logits_kl_weighted"] = dcfg.logits_weight * row["logits_kl"]
                row["attention_weighted"] = dcfg.attention_weight * row["attention"]
                if board is not None:
                    board.push.remote(row)
                window = {k: 0.0 for k in window} | {"n": 0}
                window_start, window_tokens = now, 0
            ckpt_due = done or (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0)
            if ckpt_due:
                checkpoint = _save_checkpoint(core, cfg, {"step": step, "tokens": tokens}) if rank == 0 else None
                ray.train.report({"step": step, "tokens": tokens}, checkpoint=checkpoint)
            if done:
                break
            last = time.perf_counter()
    finally:
        if qkv_ctx:
            qkv_ctx.__exit__(None, None, None)
