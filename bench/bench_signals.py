"""Which teacher signal distils better at tau = 5: sampled (12 draws) vs top-32 + tail.

Trains the 8-layer CPU student (logits-only, lambda 10, lr 1e-3 with 3 warm-up steps, batch 4 x 256
Shakespeare tokens, one thread) for `steps` steps on each signal from the same start and seed, and
reports held-out CE and the dense KL(teacher || student) at tau 5 before and after. One seed per
signal: a first look, not a spread (the README says so).

    python bench/bench_signals.py [--steps 40]
"""

import argparse

import numpy as np
import torch

from distillation.config import load_config
from distillation.data.packing import full_rows, next_token_labels
from distillation.data.sources import load_documents
from distillation.losses import DenseTargets, bitdistill_loss, cross_entropy, logits_kl
from distillation.models import load_causal_lm, load_tokenizer, resolve_model
from distillation.student import build_student, set_compile
from distillation.teachers.hf import HFTeacher
from distillation.training.plan import loss_weights
from distillation.training.step import targets_from_columns

TAU = 5.0


def _evaluate(model, held, teacher_logits):
    model.eval()
    with torch.no_grad():
        logits, labels = model(input_ids=held).logits, next_token_labels(held)
        result = cross_entropy(logits, labels).item(), logits_kl(logits, DenseTargets(teacher_logits), labels, TAU,
                                                                 False).item()
    model.train()
    return result


def run(signal: str, steps: int) -> tuple:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config()
    model_dir = resolve_model(cfg.teacher.model, cfg.data.cache_dir)
    tokenizer = load_tokenizer(model_dir)
    docs = load_documents("shakespeare", "shakespeare", None, cfg.data.cache_dir, 200_000)
    rows = full_rows([np.array(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs[:30]], 256)
    order = np.random.default_rng(0).permutation(len(rows))
    held, train = torch.as_tensor(rows[order[:8]]).long(), rows[order[8:]]
    teacher = HFTeacher(model_dir, 32, TAU, None, signal=signal, draws=12)
    with torch.no_grad():
        teacher_logits = load_causal_lm(model_dir).eval()(input_ids=held).logits
    student = build_student(cfg)
    before = _evaluate(student, held, teacher_logits)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.95))
    weights = loss_weights(attention_weight=0.0)
    for step in range(steps):
        ids = train[step * 4:(step + 1) * 4]
        columns = {k: torch.as_tensor(v) for k, v in teacher.score(ids).to_columns().items()}
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 3)
        x = torch.as_tensor(ids).long()
        out = bitdistill_loss(student(input_ids=x).logits, next_token_labels(x), weights, targets_from_columns(columns))
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return before, _evaluate(student, held, teacher_logits)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    set_compile(False)
    print(f"| signal | held-out CE before -> after | KL(teacher || student) at tau {TAU} before -> after |")
    print("|---|---|---|")
    for signal in ("sampled", "topk"):
        (ce0, kl0), (ce1, kl1) = run(signal, args.steps)
        print(f"| {signal} | {ce0:.3f} -> {ce1:.3f} | {kl0:.3f} -> {kl1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
