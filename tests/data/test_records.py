"""Records rendered into token ids with their responses labelled (data/records.py), on SmolLM2's real
tokenizer and chat template. The labelled tokens are checked by decoding them, and the ids against
the tokenizer's own rendering of the conversation, not against our own spans."""

import copy

import numpy as np
import pytest

from distillation.data.records import check_turns, prompt_turns, render, uses_chat_template
from distillation.errors import DistillError

CHAT = (("user", "Is this good?"), ("assistant", "positive"), ("user", "And this one?"), ("assistant", "negative, sadly"))


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from distillation.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def no_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def _labelled_text(tokenizer, ids, labelled):
    """Each run of labelled tokens, decoded."""
    runs, current = [], []
    for token, learned in zip(ids.tolist(), labelled.tolist()):
        if learned:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    return runs + ([tokenizer.decode(current)] if current else [])


def test_a_chat_is_the_templates_tokens_with_each_assistant_turn_and_its_end_marker_labelled(tokenizer):
    ids, labelled = render(tokenizer, CHAT, chat=True)
    messages = [{"role": r, "content": c} for r, c in CHAT]
    want = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids.tolist() == want  # exactly what the model would be given, nothing appended
    assert _labelled_text(tokenizer, ids, labelled) == ["positive<|im_end|>", "negative, sadly<|im_end|>"]
    assert tokenizer.eos_token == "<|im_end|>" and ids.dtype == np.int32 and labelled.dtype == bool


def test_a_prompt_and_response_is_a_user_and_an_assistant_turn_under_the_chat_template(tokenizer):
    ids, labelled = render(tokenizer, prompt_turns("great film", "positive", "Review: {prompt}"), chat=True)
    text = tokenizer.decode(ids)
    assert "<|im_start|>user\nReview: great film<|im_end|>" in text and text.endswith("<|im_start|>assistant\npositive<|im_end|>\n")
    assert _labelled_text(tokenizer, ids, labelled) == ["positive<|im_end|>"]


def test_plain_rendering_is_the_prompt_then_the_response_and_eos_and_roles_for_a_chat(tokenizer, no_template):
    ids, labelled = render(no_template, prompt_turns("great film", "positive", "Review: {prompt}\nSentiment: "), chat=False)
    assert tokenizer.decode(ids) == "Review: great film\nSentiment: positive<|im_end|>"
    # " positive" is one token: it reaches into the response, so it is learned, space and all
    assert _labelled_text(tokenizer, ids, labelled) == [" positive<|im_end|>"]
    ids, labelled = render(no_template, CHAT, chat=False)
    assert tokenizer.decode(ids) == ("user: Is this good?\nassistant: positive<|im_end|>\nuser: And this one?\n"
                                     "assistant: negative, sadly<|im_end|>\n")
    assert _labelled_text(tokenizer, ids, labelled) == [" positive<|im_end|>", " negative, sadly<|im_end|>"]


def test_which_template_follows_data_chat_template(tokenizer, no_template):
    assert uses_chat_template(tokenizer, "auto") and uses_chat_template(tokenizer, "tokenizer")
    assert not uses_chat_template(tokenizer, "plain") and not uses_chat_template(no_template, "auto")
    with pytest.raises(DistillError, match="data.chat_template=tokenizer, but the tokenizer has no chat template"):
        uses_chat_template(no_template, "tokenizer")


@pytest.mark.parametrize("turns, message", [
    ([{"role": "user", "content": "hi"}], "has no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "an assistant turn is empty"),
    ([{"role": "user"}], "needs a string 'role' and 'content'"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
])
def test_a_conversation_nothing_can_be_learned_from_is_refused_naming_the_record(turns, message):
    with pytest.raises(DistillError, match=message) as caught:
        check_turns(turns, "chats.jsonl:7")
    assert str(caught.value).startswith("chats.jsonl:7: ") and "\n" not in str(caught.value)
