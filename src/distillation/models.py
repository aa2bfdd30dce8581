"""Locating and loading causal LMs (safetensors only, no remote code by default), Q/K/V capture, and
the forward pass on (possibly packed) rows."""

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import torch
from torch import nn

from distillation.assets import BUILTIN_MODELS, builtin_model_dir
from distillation.errors import DistillError
from distillation.losses.attention import QKV

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


READER_PATTERNS = ["*.json", "tokenizer*", "*.jinja", "*.txt"]  # config and tokenizer: what a data reader needs
HUB_FILES = READER_PATTERNS + ["*.safetensors"]  # never pickled weights


def resolve_model(name_or_path: str, cache_dir: str, revision: Optional[str] = None, weights: bool = True) -> Path:
    """A built-in model name, a local directory holding config.json + *.safetensors, or a hub name
    (`Qwen/Qwen3-1.7B`, at `revision` if given), downloaded once into `<cache_dir>/hub` (safetensors
    only; without them when not `weights`: a data reader needs the tokenizer, not gigabytes) where a
    hub is reachable; an already downloaded one is used offline."""
    if name_or_path in BUILTIN_MODELS:
        return builtin_model_dir(name_or_path, cache_dir)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        if _looks_like_hub_name(name_or_path):
            return _from_hub(name_or_path, cache_dir, revision, weights)
        raise DistillError(f"model path '{name_or_path}' does not exist; expected a directory with config.json "
                           f"and *.safetensors, a hub name like Qwen/Qwen3-1.7B, or one of: {', '.join(BUILTIN_MODELS)}")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise DistillError(f"model path '{name_or_path}' has no config.json or no *.safetensors weights")
    return path


@dataclass(frozen=True)
class ModelRef:
    """A model as any node finds it. What crosses to replicas, workers and readers is this, not the
    driver's folder: each resolves it on its own node (`local_dir`), so a built-in or hub model lands
    in that node's `data.cache_dir` (once per node; once per cluster where that is a shared mount).
    A hub model is pinned to the revision the driver resolved, so every node loads the weights the
    driver checked. A local folder must be at the same path on every node (a shared mount)."""
    name: str
    cache_dir: str
    revision: Optional[str] = None

    def local_dir(self, weights: bool = True) -> Path:
        return resolve_model(self.name, self.cache_dir, self.revision, weights)


def pin_model(name_or_path: str, cache_dir: str) -> tuple:
    """(ModelRef, the folder on this node): resolved here, a hub model's revision pinned."""
    folder = resolve_model(name_or_path, cache_dir)
    if name_or_path not in BUILTIN_MODELS and Path(name_or_path).expanduser().is_dir():  # a local folder:
        return ModelRef(str(folder.resolve()), cache_dir), folder  # absolute, not against each worker's cwd
    revision = folder.name if folder.parent.name == "snapshots" else None  # a hub model: huggingface_hub's layout
    return ModelRef(name_or_path, cache_dir, revision), folder


ModelSource = Union[str, Path, ModelRef]


def local_dir(model: ModelSource, weights: bool = True) -> Path:
    """A model's folder on this node (ModelRef resolved here, with its weights unless not `weights`;
    a path as it is)."""
    return model.local_dir(weights) if isinstance(model, ModelRef) else Path(model)


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _from_hub(name: str, cache_dir: str, revision: Optional[str] = None, weights: bool = True) -> Path:
    """Where the cluster shares `data.cache_dir` (a mount on every node), one download serves all."""
    from huggingface_hub import snapshot_download

    hub_cache = Path(cache_dir).expanduser() / "hub"
    fetch: Dict[str, Any] = dict(cache_dir=hub_cache, allow_patterns=HUB_FILES if weights else READER_PATTERNS, revision=revision)

    def complete(folder: Path) -> bool:
        return (folder / "config.json").is_file() and (not weights or any(folder.glob("*.safetensors")))

    try:  # a copy downloaded earlier first: no hub round trip on every resolve (driver and each worker)
        folder = Path(snapshot_download(name, local_files_only=True, **fetch))
        if not complete(folder):  # a reader's tokenizer-only copy, and the weights are needed now
            raise FileNotFoundError(folder)
    except Exception:
        try:
            folder = Path(snapshot_download(name, **fetch))
        except Exception as exc:  # offline, unknown name, gated repository: one line saying what was tried
            at = f" at revision {revision}" if revision else ""
            raise DistillError(f"model '{name}'{at} is not built in, not a local folder, and could not be fetched from the "
                               f"hub into {hub_cache} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not complete(folder):
        raise DistillError(f"hub model '{name}' has no config.json or no *.safetensors weights (only those are loaded)")
    return folder


def load_causal_lm(model: ModelSource, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        local_dir(model), dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


_TOKENIZERS: dict = {}  # per process: a reader or a worker loads a model's tokenizer once


def cached_tokenizer(model: ModelSource):
    """`model`'s tokenizer, resolved on this node (no weights fetched) and loaded once per process."""
    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = load_tokenizer(local_dir(model, weights=False))
    return _TOKENIZERS[model]


def load_output_head(model: ModelSource, vocab_size: Optional[int] = None, trust_remote_code: bool = False):
    """A frozen fp32 copy of a causal LM's output head (`losses.OutputHead`), read from its
    safetensors files without loading the rest of the model.

    The head's parameter names come from the model class itself (built on the meta device), so tied
    heads (SmolLM2: lm_head shares the embedding matrix, whose tensor alone is stored) and untied
    ones are found alike."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from distillation.losses.targets import OutputHead

    model_dir = local_dir(model)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = {id(p): n for n, p in skeleton.named_parameters(remove_duplicate=False)}
    head = skeleton.get_output_embeddings()
    candidates = [n for n, p in skeleton.named_parameters(remove_duplicate=False) if p is head.weight]
    if getattr(config, "tie_word_embeddings", False):
        candidates.append(names[id(skeleton.get_input_embeddings().weight)])
    bias_name = names[id(head.bias)] if getattr(head, "bias", None) is not None else None
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key in candidates or key == bias_name:
                    tensors[key] = handle.get_tensor(key)
    weight = next((tensors[n] for n in candidates if n in tensors), None)
    if weight is None:
        raise DistillError(f"no output head weights ({' or '.join(candidates)}) in the safetensors files of {model_dir}")
    scale, softcap = head_scale_and_softcap(config)
    return OutputHead(weight, tensors.get(bias_name), scale=scale, softcap=softcap, vocab_size=vocab_size)


def head_scale_and_softcap(config: Any) -> tuple:
    """What a model does to its head's output before the logits (1.0 and None for Llama, Qwen,
    SmolLM2): Cohere's logit_scale, Gemma's final_logit_softcapping."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "logit_scale", None) or 1.0, getattr(text, "final_logit_softcapping", None)


def check_output_head(model: nn.Module, model_dir: ModelSource, input_ids, vocab_size: int) -> None:
    """The hidden-state signal rebuilds logits with `load_output_head`; a head that does more than it
    knows (a model-specific scaling, say) would silently give another distribution: compare once."""
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad(), capture_head_input(model) as captured:
        expected = model(input_ids=ids).logits[..., :vocab_size].float().cpu()
    rebuilt = load_output_head(model_dir, vocab_size)(captured["hidden"].float().cpu())
    gap = (rebuilt - expected).abs().max().item()
    if not gap <= 1e-3 * max(1.0, expected.abs().max().item()):
        raise DistillError(f"teacher.signal=hidden cannot rebuild {model_dir}'s logits from its output head "
                           f"(largest difference {gap:.3g}); use teacher.signal=sampled or topk for this model")


@contextlib.contextmanager
def capture_head_input(model: nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
    """Record what enters the output head (the final hidden states, after the final norm)."""
    states: Dict[str, torch.Tensor] = {}

    def hook(_module, inputs):
        states["hidden"] = inputs[0]
    head = model.get_output_embeddings()  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module
    handle = head.register_forward_pre_hook(hook)
    try:
        yield states
    finally:
        handle.remove()


def plain_output_head(model: nn.Module) -> Optional[nn.Linear]:
    """The model's output head where its logits are exactly `head(final hidden states)`: a plain
    nn.Linear (a ternary student keeps its head in full precision) with no logit scale or soft-capping
    after it. None otherwise: the loss then takes the model's logits."""
    head = model.get_output_embeddings()  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module
    return head if type(head) is nn.Linear and head_scale_and_softcap(model.config) == (1.0, None) else None


@contextlib.contextmanager
def output_head_skipped(head: Optional[nn.Linear]) -> Iterator[None]:
    """While open, the model's forward returns its final hidden states as `.logits` (its head passes
    them through), so the loss can apply the head one chunk of tokens at a time."""
    if head is None:
        yield
        return
    setattr(head, "forward", lambda hidden: hidden)  # an instance attribute shadows Linear.forward
    try:
        yield
    finally:
        delattr(head, "forward")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module


@contextlib.contextmanager
def capture_qkv(model: nn.Module, layer: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the outputs of `layer`'s q/k/v projections (before RoPE) with forward hooks.

    Hooks rather than `output_attentions`, so the fast attention kernels stay in use and only one
    layer's states are kept.
    """
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise DistillError(f"attention layer {layer} is out of range for a model with {len(layers)} layers")
    attn = layers[layer].self_attn
    states: Dict[str, torch.Tensor] = {}
    handles = []
    for key in QKV:
        def hook(_module, _inputs, output, key=key):
            states[key] = output
        handles.append(getattr(attn, f"{key}_proj").register_forward_hook(hook))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def forward_rows(model: nn.Module, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None):
    """`model` on training rows; `positions` (packed rows, data/packing.py) keep attention inside each
    document. No KV cache: transformers only reads packed positions when there is none, and scoring
    never needs one."""
    return model(input_ids=input_ids, position_ids=positions, use_cache=False)
