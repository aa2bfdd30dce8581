"""The transformers teacher: hidden states, sampled or top-k + tail targets, and Q/K/V of one layer."""

from contextlib import nullcontext
from typing import TYPE_CHECKING, ContextManager, Dict, Optional, cast

import numpy as np
import torch

from distillation.config.schema import TeacherConfig, choices
from distillation.data.packing import check_positions
from distillation.errors import DistillError
from distillation.losses.targets import sampled_targets, sparse_targets
from distillation.models import ModelSource, capture_qkv, forward_rows, load_causal_lm, local_dir
from distillation.teachers.cache_store import sequence_key
from distillation.teachers.protocol import TeacherBase
from distillation.teachers.schema import TeacherOutput

if TYPE_CHECKING:
    from transformers import PreTrainedConfig  # self.model.config: nn.Module types it Tensor | Module


def row_generator(row: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Generator:
    """A generator seeded by one row alone (its cache key), so a row gets the same draws whether it
    is scored alone, in a Serve batch, split across forward passes, by the precompute job or live."""
    digest = bytes.fromhex(sequence_key(row.cpu().numpy(), None if positions is None else positions.cpu().numpy()))
    return torch.Generator(device=row.device).manual_seed(int.from_bytes(digest[:8], "little"))


class HFTeacher(TeacherBase):
    """Scores token ids with a transformers causal LM.

    Memory is bounded by `max_tokens_per_batch`: a request with more tokens is split into several
    forward passes (and the answers joined), so a long batch can never exhaust the replica.
    """

    def __init__(self, model_dir: ModelSource, top_k: int, temperature: float, qkv_layer: Optional[int] = None,
                 dtype: str = "bfloat16", max_tokens_per_batch: int = 4096, trust_remote_code: bool = False,
                 device: str = "cpu", vocab_size: Optional[int] = None, signal: str = "topk", draws: int = 12):
        self.model_dir = local_dir(model_dir)  # a ModelRef resolves on the replica's node
        self.model = load_causal_lm(self.model_dir, dtype, trust_remote_code).to(device).eval()
        self.vocab_size: int = vocab_size or cast("PreTrainedConfig", self.model.config).vocab_size
        if not 0 < top_k <= self.vocab_size:
            raise DistillError(f"teacher.top_k={top_k} must be between 1 and the vocabulary size {self.vocab_size}")
        if signal not in choices(TeacherConfig, "signal"):
            raise DistillError(f"teacher.signal must be one of {choices(TeacherConfig, 'signal')}, not {signal!r}")
        self.top_k, self.temperature, self.qkv_layer = top_k, float(temperature), qkv_layer
        self.signal, self.draws = signal, draws
        self.max_tokens_per_batch, self.device = max_tokens_per_batch, device

    def describe(self) -> dict:
        return {"kind": "hf", "vocab_size": self.vocab_size, "signal": self.signal, "top_k": self.top_k,
                "draws": self.draws, "temperature": self.temperature,
                "qkv_layer": self.qkv_layer,
                "num_layers": cast("PreTrainedConfig", self.model.config).num_hidden_layers}

    @torch.inference_mode()
    def _score_rows(self, ids: torch.Tensor, positions: Optional[torch.Tensor]) -> TeacherOutput:
        qkv_context: ContextManager[Dict[str, torch.Tensor]] = (
            capture_qkv(self.model, self.qkv_layer) if self.qkv_layer is not None else nullcontext({}))
        with qkv_context as states:
            if self.signal == "hidden":  # the decoder alone: its output is what the head reads
                decoder = self.model.get_decoder()  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module
                hidden = forward_rows(decoder, ids, positions).last_hidden_state
            else:
                logits = forward_rows(self.model, ids, positions).logits
        qkv = {key: value.float().cpu().numpy() for key, value in states.items()}
        if self.signal == "hidden":
            return TeacherOutput(hidden=hidden.float().cpu().numpy(), **qkv)
        # Padding rows past the shared real vocabulary are never a target (vocab.check_vocab).
        logits = logits[..., :self.vocab_size]
        temperature = np.full(ids.shape[0], self.temperature)
        if self.signal == "sampled":
            drawn = [sampled_targets(logits[i:i + 1], self.draws, self.temperature,
                                     row_generator(row, None if positions is None else positions[i]))
                     for i, row in enumerate(ids)]
            return TeacherOutput(sampled_ids=torch.cat([d.ids for d in drawn]).cpu().numpy(),
                                 sampled_weights=torch.cat([d.weights for d in drawn]).cpu().numpy(),
                                 sampled_logprobs=torch.cat([d.logprobs for d in drawn]).cpu().numpy(),
                                 temperature=temperature, **qkv)
        sparse = sparse_targets(logits, self.top_k, self.temperature)
        return TeacherOutput(topk_ids=sparse.ids.cpu().numpy(), topk_logprobs=sparse.logprobs.cpu().numpy(),
                             tail_mass=sparse.tail_mass.cpu().numpy(), temperature=temperature, **qkv)

    def score(self, input_ids: np.ndarray, positions: Optional[np.ndarray] = None) -> TeacherOutput:
        """Packed rows go through the model with their `positions`: transformers then keeps attention
        inside each document (data/packing.py), in one forward pass."""
        input_ids = np.ascontiguousarray(input_ids)
        if input_ids.ndim != 2:
            raise DistillError(f"teacher expects token ids of shape [batch, length], got {input_ids.shape}")
        length = input_ids.shape[1]
        if length > self.max_tokens_per_batch:
            raise DistillError(f"sequence of {length} tokens exceeds teacher.max_tokens_per_batch="
                               f"{self.max_tokens_per_batch}; raise the budget or shorten data.seq_len")
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise DistillError(f"token ids must lie in [0, {self.vocab_size}), "
                               f"got [{input_ids.min()}, {input_ids.max()}]")
        rows = max(1, self.max_tokens_per_batch // length)
        if positions is not None:
            check_positions(input_ids.shape, positions)
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        pos = None if positions is None else torch.as_tensor(positions, dtype=torch.long, device=self.device)
        parts = [self._score_rows(ids[i:i + rows], None if pos is None else pos[i:i + rows])
                 for i in range(0, ids.shape[0], rows)]
        try:
            return TeacherOutput.concat(parts).validate(input_ids, self.vocab_size)
        except ValueError as exc:  # NaN weights, say: name the model, not the array
            raise DistillError(f"teacher {self.model_dir} gave unusable answers: {exc}") from None
