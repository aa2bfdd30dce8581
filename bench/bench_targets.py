"""Bytes per token on the wire and distillation error for each teacher-target form, on real text.

Teacher: SmolLM2-135M-Instruct; student: its freshly converted BitNet student (a realistic, far-off
student, where target errors matter most). For every form the script measures, per token, the
KL value error |KL(form) - KL(dense)| (nats, without the tau^2 factor, tau = 5) and the cosine between
the gradient w.r.t. the student logits and the dense gradient. Sampled targets are random: several
draws, median and spread. Bytes per token are the wire sizes of the `TeacherOutput` arrays (ids
int32, log-probabilities and weights fp16, tail fp32); dense is fp16 logits.

    python bench/bench_targets.py [--tokens 2048]
"""

import argparse
import statistics

import numpy as np
import torch

from distillation.config import load_config
from distillation.data.packing import full_rows, next_token_labels
from distillation.data.sources import load_documents
from distillation.losses import DenseTargets, SparseTargets, logits_kl, sampled_targets, sparse_targets
from distillation.models import load_causal_lm, load_tokenizer, resolve_model
from distillation.student import convert_to_bitnet
from distillation.training.student_init import set_compile

TAU = 5.0


def _loss_and_grad(student_logits, targets, labels):
    x = student_logits.detach().clone().requires_grad_()
    value = logits_kl(x, targets, labels, TAU)
    value.backward()
    return value.item(), x.grad.flatten()


def _fp16_wire(targets):
    """What the receiver sees: log-probabilities and weights rounded to fp16."""
    if isinstance(targets, SparseTargets):
        targets.logprobs = targets.logprobs.half().float()
    else:
        targets.logprobs, targets.weights = targets.logprobs.half().float(), targets.weights.half().float()
    return targets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--draws", type=int, default=5, help="repetitions of each sampled form")
    args = parser.parse_args()
    set_compile(False)
    cfg = load_config()
    model_dir = resolve_model("smollm2-135m-instruct", cfg.data.cache_dir)
    tokenizer = load_tokenizer(model_dir)
    docs = load_documents("shakespeare", "shakespeare", None, cfg.data.cache_dir, args.tokens * 4)
    tokens = [np.asarray(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs[-4:]]
    ids = torch.as_tensor(full_rows(tokens, 256, args.tokens // 256)).long()
    labels = next_token_labels(ids)
    with torch.no_grad():
        teacher_logits = load_causal_lm(model_dir).eval()(input_ids=ids).logits
        student_logits = convert_to_bitnet(load_causal_lm(model_dir), "paper").eval()(input_ids=ids).logits
    vocab = teacher_logits.shape[-1]
    dense_value, dense_grad = _loss_and_grad(student_logits, DenseTargets(teacher_logits), labels)

    forms = [("dense fp16 logits", vocab * 2, lambda: DenseTargets(teacher_logits.half().float()))]
    for k in (8, 16, 32):
        def topk_only(k=k):
            t = sparse_targets(teacher_logits, k, TAU)
            t.tail_mass = torch.zeros_like(t.tail_mass)  # top-k renormalised, the lost mass ignored
            return _fp16_wire(t)
        forms.append((f"top-{k} (no tail)", k * 6, topk_only))
        forms.append((f"top-{k} + tail", k * 6 + 4, lambda k=k: _fp16_wire(sparse_targets(teacher_logits, k, TAU))))
    for n in (12, 32):
        forms.append((f"sampled, {n} draws", n * 8, lambda n=n: _fp16_wire(sampled_targets(teacher_logits, n, TAU))))

    tail32 = sparse_targets(teacher_logits, 32, TAU).tail_mass.mean().item()
    print(f"{ids.numel()} tokens of Shakespeare, vocab {vocab}, tau {TAU}: dense KL(teacher || student) "
          f"{dense_value / TAU**2:.4f} nats/token; teacher mass outside its top-32 at this tau: {tail32:.3f}")
    print("| form | bytes/token | KL error, nats/token (median [min, max]) | gradient cosine to dense |")
    print("|---|---|---|---|")
    for name, nbytes, make in forms:
        reps = args.draws if name.startswith("sampled") else 1
        errors, cosines = [], []
        for _ in range(reps):
            value, grad = _loss_and_grad(student_logits, make(), labels)
            errors.append(abs(value - dense_value) / TAU**2)  # as a raw KL, without the tau^2 factor
            cosines.append(torch.nn.functional.cosine_similarity(grad.double(), dense_grad.double(), dim=0).item())
        e, c = statistics.median(errors), statistics.median(cosines)
        spread = f" [{min(errors):.4f}, {max(errors):.4f}]" if reps > 1 else ""
        print(f"| {name} | {nbytes} | {e:.4f}{spread} | {c:.4f} |")


if __name__ == "__main__":
    main()
