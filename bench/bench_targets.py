"""Bytes per token on the wire and distillation error for each teacher-target form, on real text.

Teacher: SmolLM2-135M-Instruct; student: its freshly converted BitNet student (a realistic, far-off
student, where target errors matter most). For every form the script measures, per token, the
KL value error |KL(form) - KL(dense)| (nats, without the tau^2 factor, tau = 5) and the cosine between
the gradient w.r.t. the student logits and the dense gradient. Sampled targets are random: several
draws, median and spread. Bytes per token are the wire sizes of the `TeacherOutput` arrays (ids
int32, log-probabilities and weights fp16, tail fp32); dense is fp16 logits; hidden is the teacher's
final hidden states in fp16, turned back into logits on the student side by a frozen copy of its head.
Last, the student-side time of the chunked loss (forward + backward) per form: the extra cost of
rebuilding the dense teacher distribution from hidden states.

    python bench/bench_targets.py [--tokens 2048]
"""

import argparse
import statistics
import time

import numpy as np
import torch

from distillation.config import load_config
from distillation.data.packing import full_rows, next_token_labels
from distillation.data.sources import load_documents
from distillation.losses import (
    DenseTargets,
    HiddenTargets,
    SparseTargets,
    logit_losses,
    logits_kl,
    sampled_targets,
    sparse_targets,
)
from distillation.models import capture_head_input, load_causal_lm, load_output_head, load_tokenizer, resolve_model
from distillation.student import convert_to_bitnet, set_compile

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
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each loss timing")
    args = parser.parse_args()
    set_compile(False)
    cfg = load_config()
    model_dir = resolve_model("smollm2-135m-instruct", cfg.data.cache_dir)
    tokenizer = load_tokenizer(model_dir)
    docs = load_documents("shakespeare", "shakespeare", None, cfg.data.cache_dir, args.tokens * 4)
    tokens = [np.asarray(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs[-4:]]
    ids = torch.as_tensor(full_rows(tokens, 256, args.tokens // 256)).long()
    labels = next_token_labels(ids)
    teacher = load_causal_lm(model_dir).eval()
    with torch.no_grad(), capture_head_input(teacher) as captured:
        teacher_logits = teacher(input_ids=ids).logits
    hidden = captured["hidden"].half()  # the wire format of teacher.signal=hidden
    head = load_output_head(model_dir)
    with torch.no_grad():
        student_logits = convert_to_bitnet(load_causal_lm(model_dir), "paper").eval()(input_ids=ids).logits
    vocab = teacher_logits.shape[-1]
    dense_value, dense_grad = _loss_and_grad(student_logits, DenseTargets(teacher_logits), labels)

    forms = [("dense fp16 logits", vocab * 2, lambda: DenseTargets(teacher_logits.half().float())),
             ("hidden states fp16 + teacher head (`signal=hidden`)", hidden.shape[-1] * 2,
              lambda: HiddenTargets(hidden, head))]
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
    _loss_times(student_logits, labels, {"sampled, 12 draws": lambda: sampled_targets(teacher_logits, 12, TAU),
                                         "top-32 + tail": lambda: sparse_targets(teacher_logits, 32, TAU),
                                         "hidden + head": lambda: HiddenTargets(hidden, head),
                                         "dense fp32 logits": lambda: DenseTargets(teacher_logits)}, args.reps)


def _loss_times(student_logits, labels, forms, reps):
    """Seconds per 1,024 tokens of the training loss (CE + L_LD, chunked, forward + backward)."""
    tokens = labels.numel()
    print(f"\nstudent-side loss time, CE + L_LD forward + backward, {tokens} tokens, "
          f"{torch.get_num_threads()} threads (median [min, max] of {reps}):")
    print("| form | seconds per 1,024 tokens | vs sampled |")
    print("|---|---|---|")
    base = None
    for name, make in forms.items():
        targets, times = make(), []
        for _ in range(reps + 1):
            x = student_logits.detach().clone().requires_grad_()
            start = time.perf_counter()
            logit_losses(x, labels, targets, TAU, True, 1.0, 10.0)[0].backward()
            times.append((time.perf_counter() - start) * 1024 / tokens)
        times = times[1:]  # the first call warms up
        median = statistics.median(times)
        base = base or median
        print(f"| {name} | {median:.3f} [{min(times):.3f}, {max(times):.3f}] | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
