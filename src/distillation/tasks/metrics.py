"""A model scored on a task's held-out records, rendered exactly as training renders them
(data/records.py), so a prompt the model was trained on and one it is scored on look alike.

- `accuracy`: the greedily decoded answer (up to EOS), normalised, equals the label word;
- `label_accuracy`: the label word whose tokens (and EOS) the model gives the highest
  log-likelihood after the prompt is the gold one (the usual way to score a classifier LM);
- `rouge_l`: ROUGE-L F1 of the decoded answer against the reference (`rouge-score`, stemmed);
- `exact_match`: the decoded answer, normalised, equals the reference.
"""

import re
from typing import Dict, List, Sequence

import numpy as np
import torch

from distillation.data.records import Turns, generation_prompt, render
from distillation.tasks import GENERATED, Example


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def prompt_ids(tokenizer, prompt: Turns, chat: bool) -> List[int]:
    """The tokens a model continues to answer: the template's generation prompt, or the plain text."""
    return tokenizer(generation_prompt(tokenizer, prompt, chat), add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def greedy_answers(model, tokenizer, examples: Sequence[Example], chat: bool, max_new_tokens: int) -> List[str]:
    device = next(model.parameters()).device
    answers = []
    for example in examples:
        ids = torch.tensor([prompt_ids(tokenizer, example.prompt, chat)], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


@torch.inference_mode()
def label_log_likelihoods(model, tokenizer, example: Example, labels: Sequence[str], chat: bool) -> np.ndarray:
    """log p(label, EOS | prompt) of each label, summed over the label's labelled tokens."""
    device = next(model.parameters()).device
    rows = [render(tokenizer, (*example.prompt, ("response", label)), chat) for label in labels]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.eos_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, labelled) in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, :len(row)] = torch.as_tensor(labelled)
    logprobs = torch.log_softmax(model(input_ids=ids.to(device)).logits.float(), -1)[:, :-1]
    picked = logprobs.gather(-1, ids[:, 1:, None].to(device))[..., 0]
    return (picked * mask[:, 1:].to(device)).sum(-1).cpu().numpy()


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def score_task(model, tokenizer, examples: Sequence[Example], metrics: Sequence[str], chat: bool,
               labels: Sequence[str] = (), max_new_tokens: int = 32) -> Dict[str, float]:
    """{metric: value in [0, 1]} over `examples`, plus "examples": how many were scored."""
    model.eval()
    out: Dict[str, float] = {"examples": float(len(examples))}
    gold = [normalise(e.answer) for e in examples]
    if any(m in GENERATED for m in metrics):
        decoded = greedy_answers(model, tokenizer, examples, chat, max_new_tokens)
        said = [normalise(a) for a in decoded]
        if "accuracy" in metrics:  # the label word opens the answer
            out["accuracy"] = float(np.mean([s.split()[:1] == g.split()[:1] for s, g in zip(said, gold)]))
        if "exact_match" in metrics:
            out["exact_match"] = float(np.mean([s == g for s, g in zip(said, gold)]))
        if "rouge_l" in metrics:
            out["rouge_l"] = rouge_l(decoded, [e.answer for e in examples])
    if "label_accuracy" in metrics:
        picks = [int(np.argmax(label_log_likelihoods(model, tokenizer, e, labels, chat))) for e in examples]
        out["label_accuracy"] = float(np.mean([normalise(labels[p]) == g for p, g in zip(picks, gold)]))
    return out
