"""Size of the packed 2-bit ternary student against its fp16 form, on the real SmolLM2 student.

Converts SmolLM2-135M-Instruct (all 30 layers), packs it, saves both, and reports the BitNet layers'
weight bytes (2-bit + one fp32 scale per matrix vs fp16), whole-checkpoint file sizes, and the
largest logit difference between the packed and the training-time model on real text.

    python bench/bench_packed.py
"""

import copy
import tempfile
from pathlib import Path

import torch
from transformers.integrations.bitnet import BitLinear

from distillation.config import load_config
from distillation.models import load_causal_lm, load_tokenizer, resolve_model
from distillation.student import (
    convert_to_bitnet,
    linear_weight_bytes,
    load_student,
    pack_student,
    save_student,
    set_compile,
)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main():
    set_compile(False)
    model_dir = resolve_model("smollm2-135m-instruct", load_config().data.cache_dir)
    student = convert_to_bitnet(load_causal_lm(model_dir), "paper").eval()
    ids = load_tokenizer(model_dir)("To be, or not to be, that is the question: whether 'tis nobler in the mind",
                                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        trained = student(input_ids=ids).logits
    fp16_sizes = linear_weight_bytes(student)
    with tempfile.TemporaryDirectory() as tmp:
        fp16_dir = save_student(copy.deepcopy(student).half(), Path(tmp) / "fp16")
        reference = copy.deepcopy(student)
        packed = pack_student(student)
        packed_dir = save_student(packed, Path(tmp) / "packed")
        sizes = linear_weight_bytes(packed)
        reloaded = load_student(packed_dir).eval()
        with torch.no_grad():
            out = reloaded(input_ids=ids).logits
        diff = (out - trained).abs()
        kl = torch.nn.functional.kl_div(out.log_softmax(-1), trained.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean().item()
        agree = (out.argmax(-1) == trained.argmax(-1)).float().mean().item()
        files = (_dir_bytes(fp16_dir), _dir_bytes(packed_dir))
    mib = 2**20
    print(f"SmolLM2-135M BitNet student, {sum(1 for m in packed.modules() if isinstance(m, BitLinear))} "
          "BitLinear matrices")
    print(f"BitNet layer weights: fp16 {sizes['fp16'] / mib:.2f} MiB -> packed {sizes['stored'] / mib:.2f} MiB "
          f"({sizes['fp16'] / sizes['stored']:.4f}x smaller)")
    assert sizes["fp16"] == fp16_sizes["fp16"]
    print(f"whole checkpoint (packed keeps embeddings and norms fp32): fp16 {files[0] / mib:.1f} MiB, packed {files[1] / mib:.1f} MiB")
    print(f"packed vs training-time model on real text ({ids.shape[1]} tokens): |logit diff| mean "
          f"{diff.mean():.2e}, max {diff.max():.2e} (logit scale {trained.abs().mean():.1f}); "
          f"KL {kl:.2e} nats/token; top-1 agreement {agree:.3f}")
    # Layer by layer: equal within float rounding. Across 30 layers, int8 activation rounding can
    # flip where the two equal formulas differ by an ulp, and such flips propagate to the logits.
    worst = 0.0
    for layer, packed_layer in zip(reference.modules(), packed.modules()):
        if isinstance(packed_layer, BitLinear):
            x = torch.randn(2, 32, layer.in_features)
            with torch.no_grad():
                want = layer(x)
                worst = max(worst, ((packed_layer(x) - want).abs().max() / want.abs().max()).item())
    print(f"each BitLinear alone, random input: worst max relative difference {worst:.1e}")


if __name__ == "__main__":
    main()
