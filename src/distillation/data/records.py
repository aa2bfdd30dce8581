"""Prompt/response and chat records as token ids with the tokens the loss predicts marked.

A record is a conversation: `(role, content)` turns. A prompt/response pair is a "prompt" turn (the
prompt inside `data.prompt_template`, default `"{prompt}\n"`) and a "response" turn, which a chat
template sees as a user and an assistant turn. Rendered

- with the tokenizer's chat template (`data.chat_template: auto` where it has one, or `tokenizer`),
  as TRL and the hub's chat models do: the labelled tokens are those of each assistant turn's
  content and the template's end-of-turn marker; or
- plainly (`data.chat_template: plain`, or `auto` without a template): a prompt then its response;
  a conversation's turns as `"{role}: {content}\\n"`, the assistant's content labelled.

Either way EOS ends every response (appended where the template does not end the turn with it), so
a student learns to stop.

Why not `apply_chat_template(return_assistant_tokens_mask=True)`: it needs `{% generation %}` markers
that most templates (SmolLM2's, Llama's) lack. The template is instead rendered up to each assistant
turn and through it; the difference is the turn's characters, and a token is labelled when it reaches
into one (offsets of one tokenization of the whole text, so the ids are exactly what the model sees).
"""

from typing import List, Sequence, Tuple

import numpy as np

from distillation.errors import DistillError

Turns = Tuple[Tuple[str, str], ...]  # (role, content), in order
LEARNED = ("assistant", "response")  # the roles whose content the loss predicts
CHAT_ROLE = {"prompt": "user", "response": "assistant"}  # a prompt/response pair under a chat template


def uses_chat_template(tokenizer, template: str) -> bool:
    """Whether records render with the tokenizer's chat template (`data.chat_template`)."""
    if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise DistillError("data.chat_template=tokenizer, but the tokenizer has no chat template; "
                           "use data.chat_template=plain (or auto)")
    return template != "plain" and bool(getattr(tokenizer, "chat_template", None))


def prompt_turns(prompt: str, response: str, prompt_template: str) -> Turns:
    return (("prompt", prompt_template.format(prompt=prompt)), ("response", response))


def split_record(turns: Turns) -> Tuple[Turns, str]:
    """A record's turns before its last answer, and that answer."""
    last = max(i for i, (role, _) in enumerate(turns) if role in LEARNED)
    return turns[:last], turns[last][1]


def _messages(turns: Turns) -> List[dict]:
    return [{"role": CHAT_ROLE.get(role, role), "content": content} for role, content in turns]


def generation_prompt(tokenizer, turns: Turns, chat: bool) -> str:
    """The text a model continues to answer after `turns` (a record's turns before its answer),
    rendered as `render` renders the record."""
    if chat:
        return tokenizer.apply_chat_template(_messages(turns), tokenize=False, add_generation_prompt=True)
    text, _ = _plain_spans(turns, "")
    return text if turns[-1][0] == "prompt" else text + "assistant:"  # the answer's tokens bring its space


def _chat_spans(tokenizer, turns: Turns) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the [start, stop) characters of each assistant turn, which end
    at its EOS when the template writes one (what follows it, a newline, is no label)."""
    messages = _messages(turns)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, (role, _) in enumerate(turns):
        if role not in LEARNED:
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DistillError("the tokenizer's chat template does not render a conversation turn by turn (each "
                               "prefix a prefix of the whole); use data.chat_template=plain")
        stop = through.rfind(eos, len(before)) + len(eos) if eos and eos in through[len(before):] else len(through)
        spans.append((len(before), stop))
    return text, spans


def _plain_spans(turns: Turns, eos: str) -> Tuple[str, List[Tuple[int, int]]]:
    text, spans = "", []
    for role, content in turns:
        text += "" if role in ("prompt", "response") else f"{role}: "
        if role in LEARNED:
            spans.append((len(text), len(text) + len(content) + len(eos)))
            content += eos
        text += content if role in ("prompt", "response") else content + "\n"
    return text, spans


def render(tokenizer, turns: Turns, chat: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(token ids int32, labelled bool) of one record; the last assistant turn ends with EOS."""
    eos = tokenizer.eos_token or ""
    text, spans = _chat_spans(tokenizer, turns) if chat else _plain_spans(turns, eos)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    labelled = np.zeros(len(ids), bool)
    for start, stop in spans:  # a token reaching into the response is one (" positive" after "Sentiment:")
        labelled |= (offsets[:, 1] > start) & (offsets[:, 0] < stop)
    last = int(np.flatnonzero(labelled)[-1]) if labelled.any() else -1
    if last < 0 or ids[last] != tokenizer.eos_token_id:  # the template ends the turn with no EOS: add one
        ids = np.insert(ids, last + 1, tokenizer.eos_token_id).astype(np.int32)
        labelled = np.insert(labelled, last + 1, True)
    return ids, labelled


def check_turns(turns: Sequence, where: str) -> Turns:
    """`turns` (a record's messages) as Turns, or a one-line error naming the record (`where`)."""
    if not isinstance(turns, (list, tuple)) or not turns:
        raise DistillError(f"{where}: messages must be a non-empty list of {{role, content}}")
    out = []
    for turn in turns:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise DistillError(f"{where}: every message needs a string 'role' and 'content'; found {turn!r:.80}")
        out.append((turn["role"], turn["content"]))
    answers = [content for role, content in out if role in LEARNED]
    if not answers:
        raise DistillError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    if not all(a.strip() for a in answers):
        raise DistillError(f"{where}: an assistant turn is empty")
    return tuple(out)
