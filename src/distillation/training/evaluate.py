"""Held-out loss: mean next-token cross-entropy (nats/token) and bits per byte of the raw text.

One scoring path for everything: the run summary (and the benches that read it) score the held-out
split with `heldout_loss`, and `distill eval` scores a text file with `score_text`, which cuts the
file into rows exactly as the training data is cut and then calls `heldout_loss`.
"""

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distillation.data.packing import Packed, pack, packed_labels, predicted_bytes
from distillation.errors import DistillError
from distillation.losses import IGNORE_INDEX

if TYPE_CHECKING:
    from distillation.specs import StudentSpec
    from distillation.tasks.probe import TaskProbe


@torch.inference_mode()
def heldout_loss(model: nn.Module, packed: Packed, num_bytes: int, batch_size: int = 4) -> dict:
    """`num_bytes`: UTF-8 bytes of the predicted tokens (`predicted_bytes`); with records, only
    the responses are scored."""
    model.eval()
    device = next(model.parameters()).device  # rows come as numpy; the model may live on a GPU
    total_nats, total_tokens = 0.0, 0
    for start in range(0, len(packed.rows), batch_size):
        ids, labels, _ = packed_labels(packed.take(slice(start, start + batch_size)), device=device)
        logits = model(input_ids=ids).logits.float()  # held-out rows hold one document each: no positions
        total_nats += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                      reduction="sum").item()
        total_tokens += int((labels != IGNORE_INDEX).sum())
    return {"loss": total_nats / max(total_tokens, 1), "tokens": total_tokens,
            "bits_per_byte": total_nats / math.log(2) / max(num_bytes, 1)}


def text_rows(tokenizer, text: str, seq_len: int) -> Packed:
    """`text` as ONE document, tokenized as the training data is (no special tokens) and cut into
    consecutive rows of `seq_len` by the training packer: no overlap, padding carries no label."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return pack([ids], pad_id, seq_len)


def score_text(model: nn.Module, tokenizer, text: str, seq_len: int, batch_size: int = 4) -> dict:
    """{"loss" (nats/token), "bits_per_byte", "tokens" (predicted), "bytes" (UTF-8 bytes of those
    tokens)} of `model` on `text`, through `heldout_loss`."""
    if seq_len < 2:
        raise DistillError(f"seq_len must be at least 2, not {seq_len}")
    packed = text_rows(tokenizer, text, seq_len)
    if len(packed.rows) == 0:
        raise DistillError("the text has fewer than 2 tokens: nothing to predict")
    vocab = model.get_input_embeddings().num_embeddings  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module
    if int(packed.rows.max()) >= vocab:
        raise DistillError(f"the tokenizer produces token id {int(packed.rows.max())}, past the model's "
                           f"{vocab}-token vocabulary: model and tokenizer do not belong together")
    num_bytes = predicted_bytes(packed, tokenizer)
    return {**heldout_loss(model, packed, num_bytes, batch_size), "bytes": num_bytes}


def starting_student(spec: "StudentSpec", resumed_checkpoint=None) -> nn.Module:
    """The student training starts from: the checkpoint a resumed run continues, else stage 1's,
    built as the workers build it."""
    from distillation.student import build_student

    return build_student(spec) if resumed_checkpoint is None else checkpoint_student(resumed_checkpoint)


def checkpoint_student(checkpoint) -> nn.Module:
    """The student of a training checkpoint (strict reload), read through Ray Train's storage."""
    from distillation.student import load_student

    with checkpoint.as_directory() as folder:
        return load_student(Path(folder) / "student", dense=True)


Job = Tuple[Callable[[], nn.Module], Optional[Callable[[nn.Module], None]]]  # (load() -> model, check(model) or None)


def score_models(jobs: List[Job], packed: Packed, num_bytes: int, device: str,
                 task: Optional["TaskProbe"] = None) -> List[dict]:
    """Each job's model loaded on `device` and scored on `packed` (held-out loss, tokens, bits/byte,
    parameters) and on `task` if given, one at a time; a job's check runs when its loss is finite."""
    results = []
    for load, check in jobs:
        model = load().to(device)
        result = {**heldout_loss(model, packed, num_bytes), "parameters": sum(p.numel() for p in model.parameters())}
        if task is not None:
            result["task"] = task.score(model)
        if check is not None and math.isfinite(result["loss"]):
            check(model)
        results.append(result)
        del model
    return results
