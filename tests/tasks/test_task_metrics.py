"""Task metrics on SmolLM2-135M-Instruct itself (real weights, CPU): the greedy answer against a
hand-written argmax loop, the label log-likelihoods against transformers' own loss, ROUGE-L against
the longest common subsequence worked by hand."""

import pytest
import torch

from distillation.data.records import prompt_turns, split_record
from distillation.tasks import Example
from distillation.tasks.metrics import greedy_answers, label_log_likelihoods, rouge_l, score_task

LABELS = ("positive", "negative")
EXAMPLES = [Example(prompt_turns(text, "", "Is this review positive or negative? {prompt}")[:1], answer)
            for text, answer in (("I loved every minute of it.", "positive"), ("A dull, tedious mess.", "negative"))]


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2_dir):
    from distillation.models import load_causal_lm, load_tokenizer

    return load_causal_lm(smollm2_dir, "float32").eval(), load_tokenizer(smollm2_dir)


def test_the_greedy_answer_is_the_argmax_continuation_up_to_eos(model_and_tokenizer):
    from distillation.tasks.metrics import prompt_ids

    model, tokenizer = model_and_tokenizer
    said = greedy_answers(model, tokenizer, EXAMPLES, chat=True, max_new_tokens=6)
    for example, answer in zip(EXAMPLES, said):
        ids = prompt_ids(tokenizer, example.prompt, chat=True)
        start = len(ids)
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                ids.append(nxt)
        assert answer == tokenizer.decode(ids[start:], skip_special_tokens=True).strip()


def test_label_log_likelihoods_are_transformers_summed_loss_over_the_label_and_eos(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    got = label_log_likelihoods(model, tokenizer, EXAMPLES[0], LABELS, chat=True)
    for label, value in zip(LABELS, got):
        messages = [{"role": "user", "content": EXAMPLES[0].prompt[0][1]}, {"role": "assistant", "content": label}]
        prefix = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prefix + label + "<|im_end|>", add_special_tokens=False)["input_ids"]
        n = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        labels = torch.tensor([[-100] * n + ids[n:]])
        with torch.no_grad():
            mean = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
        assert value == pytest.approx(-mean * (len(ids) - n), rel=1e-4)


def test_rouge_l_is_the_f_measure_of_the_longest_common_subsequence():
    # "the cat sat" vs "the cat sat on the mat": LCS 3, precision 3/3, recall 3/6
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert rouge_l(["Returns the value."], ["Return the values"]) == pytest.approx(1.0)  # stemmed, punctuation dropped


def test_a_task_score_holds_each_metric_asked_for_in_zero_to_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scores = score_task(model, tokenizer, EXAMPLES, ("accuracy", "label_accuracy", "exact_match", "rouge_l"), chat=True,
                        labels=LABELS, max_new_tokens=4)
    assert scores["examples"] == 2 and all(0 <= scores[m] <= 1 for m in ("accuracy", "label_accuracy", "exact_match"))
    picks = [LABELS[int(label_log_likelihoods(model, tokenizer, e, LABELS, chat=True).argmax())] for e in EXAMPLES]
    assert scores["label_accuracy"] == sum(p == e.answer for p, e in zip(picks, EXAMPLES)) / 2
    turns = (("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao"))
    assert split_record(turns) == (turns[:3], "ciao")
