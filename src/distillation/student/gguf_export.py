"""A student as GGUF for llama.cpp's `bitnet` architecture, written with the `gguf` package.

llama.cpp's `bitnet` graph (src/models/bitnet.cpp) is Llama with `attn_sub_norm` before the output
projection and `ffn_sub_norm` before `ffn_down`, a SiLU-gated FFN, NEOX-style rotary embeddings (no
Q/K permutation, unlike its `llama` architecture) and the token embedding as the output head. So it
holds a paper-SubLN student of a Llama-family teacher with tied embeddings and SiLU: anything else is
refused with the reason (`gguf_problem`).

Every BitLinear weight is written as its ternary values times the layer's scale: in a ternary type
(TQ2_0 or TQ1_0, blocks of 256 along a row, one fp16 scale per block, so exact up to that fp16 scale)
where the row length is a multiple of 256, else in Q8_0 (blocks of 32; +-1 becomes +-127 with scale
s/127: also exact up to fp16). The embedding stays F16, norms F32. llama.cpp does not quantize
activations per token as training does (TQ/Q8_0 dot products use 8-bit activation blocks of 256/32
values, F16 none), so its logits differ from the PyTorch student's by that rounding.

Writing our own instead of llama.cpp's convert_hf_to_gguf.py: that script is not a package, needs
the student in its own BitNet naming, and reads the tokenizer as SentencePiece for this architecture.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from transformers.integrations.bitnet import AutoBitLinear

from distillation.errors import DistillError
from distillation.student.bitnet import ternary_weights
from distillation.student.layout import bitnet_arch_problem
from distillation.student.packed import training_scale

TERNARY_TYPES = ("tq2_0", "tq1_0", "f16")  # f16: every weight F16 (the dense reference file)
QK_K = 256
# Our in-memory names -> llama.cpp's per-layer tensor names.
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.rms_norm.weight": "attn_sub_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.rms_norm.weight": "ffn_sub_norm.weight",
}
# tokenizer.json pre-tokenizers -> llama.cpp's names for the same splitting.
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",  # one digit at a time, then GPT-2's regex
}


def gguf_problem(config, subln: str) -> Optional[str]:
    """Why llama.cpp's `bitnet` architecture cannot hold this student (None: it can)."""
    if subln != "paper":
        return f"llama.cpp's bitnet architecture has the paper's two sub-norms; student.subln={subln} has other norms"
    problem = bitnet_arch_problem(config)
    if problem:
        return problem
    if config.hidden_act != "silu":
        return f"llama.cpp's bitnet architecture uses a SiLU-gated FFN, this model uses {config.hidden_act}"
    if not getattr(config, "tie_word_embeddings", False):
        return "llama.cpp's bitnet architecture uses the token embedding as output head; this model's lm_head is untied"
    if getattr(config, "attention_bias", False):
        return "llama.cpp's bitnet architecture has no attention biases, this model has"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope scaling '{rope.get('rope_type')}' is not written by this exporter"
    return None


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key: Tuple[Tuple[Any, Any], ...] = tuple((p.get("type"), p.get("individual_digits", p.get("use_regex"))) for p in parts)
    if tokenizer_json.get("model", {}).get("type") != "BPE" or key not in PRE_TOKENIZERS:
        raise DistillError(f"GGUF export knows byte-level BPE tokenizers with pre-tokenizer {list(PRE_TOKENIZERS)}; "
                           f"this one is {tokenizer_json.get('model', {}).get('type')} with {key}")
    return PRE_TOKENIZERS[key]


def read_tokenizer_json(folder: Path) -> dict:
    """The student's tokenizer.json, checked for a form llama.cpp reads (before anything is written)."""
    if not (Path(folder) / "tokenizer.json").is_file():
        raise DistillError(f"'{folder}' has no tokenizer.json: GGUF holds the tokenizer, export needs it")
    raw = json.loads((Path(folder) / "tokenizer.json").read_text())
    pre_tokenizer_name(raw)
    return raw


def _add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    raw = read_tokenizer_json(folder)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(raw))
    vocab = raw["model"]["vocab"]
    special = {t["id"]: t for t in raw.get("added_tokens", [])}
    tokens, types = [], []
    by_id = {i: s for s, i in vocab.items()} | {i: t["content"] for i, t in special.items()}
    for i in range(vocab_size):
        if i not in by_id:  # a padded embedding row: a token nothing produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if special.get(i, {}).get("special") else
                     gguf.TokenType.USER_DEFINED if i in special else gguf.TokenType.NORMAL)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if template and not (folder / "chat_template.jinja").is_file():  # SpecialVocab reads only the .jinja file
        writer.add_chat_template(template)


def _weight_type(name: str, rows: int, ternary: str):
    import gguf

    if ternary == "f16":
        return gguf.GGMLQuantizationType.F16
    if rows % QK_K == 0:
        return gguf.GGMLQuantizationType.TQ2_0 if ternary == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    return gguf.GGMLQuantizationType.Q8_0


def _tensors(model, ternary: str):
    """(gguf name, array, type) for every tensor: BitLinear weights as ternary x scale."""
    import gguf

    bitlinears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, AutoBitLinear)}
    state = {k: v.detach() for k, v in model.state_dict().items()}
    f16, f32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    yield "token_embd.weight", state["model.embed_tokens.weight"].float().numpy(), f16
    yield "output_norm.weight", state["model.norm.weight"].float().numpy(), f32
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in LAYER_TENSORS.items():
            name = prefix + ours
            if name in bitlinears:
                layer = bitlinears[name]
                dense = (ternary_weights(layer) * training_scale(layer)).float().numpy()
                yield f"blk.{i}.{theirs}", dense, _weight_type(name, layer.in_features, ternary)
            else:
                yield f"blk.{i}.{theirs}", state[name].float().numpy(), f32


@torch.no_grad()
def write_gguf(model, tokenizer_dir: Path, out: Path, ternary: str = "tq2_0", name: str = "student") -> Dict[str, int]:
    """Write `model` (an online student) to the file `out`, atomically; returns {gguf type: tensors}."""
    import gguf

    config = model.config
    problem = gguf_problem(config, config.bitnet["subln"])
    if problem:
        raise DistillError(f"cannot export to GGUF: {problem}")
    out = Path(out)
    staging = Path(tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)[1])
    counts: Dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(staging, arch="bitnet")
        writer.add_name(name)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type({"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                              "f16": gguf.LlamaFileType.MOSTLY_F16}[ternary])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, Path(tokenizer_dir), config.vocab_size)
        for tensor_name, array, qtype in _tensors(model, ternary):
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(tensor_name, array.astype(np.float32 if qtype.name == "F32" else np.float16))
            else:  # the quantized bytes; the writer derives the logical shape from them
                writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return counts

