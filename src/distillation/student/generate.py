"""`distill generate STUDENT PROMPT`: a quick look at what a student says.

STUDENT is any student folder the project wrote (a run's student/, an hf or packed export), read by
`load_student` and generated with transformers, or a GGUF file, run by llama.cpp (llama-cpp-python).
The prompt goes through the tokenizer's chat template when it has one (as one user turn), unless
`--raw`. Greedy by default; `--sample` draws with `--temperature` and `--top-p`.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List

from distillation.errors import DistillError


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    raw: bool = False  # the prompt as it is, without the chat template


def _check(opts: GenerateOptions) -> None:
    if opts.max_new_tokens < 1:
        raise DistillError(f"--max-new-tokens must be at least 1, not {opts.max_new_tokens}")
    if opts.temperature <= 0 or not 0 < opts.top_p <= 1:
        raise DistillError(f"--temperature must be > 0 and --top-p in (0, 1], not {opts.temperature} and {opts.top_p}")


def open_gguf(path: Path, n_ctx: int = 2048, logits_all: bool = False):
    """A llama.cpp model for a GGUF file (llama-cpp-python, the `llama` extra), with a context of
    `n_ctx` tokens or the model's own length where that is shorter."""
    try:
        import gguf
        import llama_cpp
    except ImportError:
        raise DistillError("running a GGUF needs llama-cpp-python: pip install 'wrinklefree-distillation[llama]'") from None
    try:
        fields = gguf.GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        n_ctx = min(n_ctx, int(fields[f"{arch}.context_length"].contents()))
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False)
    except (ValueError, KeyError) as exc:
        raise DistillError(f"llama.cpp cannot load '{path}': {exc}") from None


def greedy_gguf(llm, prompt_ids: List[int], max_new_tokens: int, stop_at_eos: bool = True) -> List[int]:
    """Greedy continuation of `prompt_ids` in llama.cpp, token ids only (no text round trip)."""
    out: List[int] = []
    if max_new_tokens < 1:
        return out
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        if stop_at_eos and token == llm.token_eos():
            break
        out.append(token)
        if len(out) == max_new_tokens:
            break
    return out


def greedy_torch(model, prompt_ids: List[int], max_new_tokens: int) -> List[int]:
    """Greedy continuation of `prompt_ids` by a transformers model: the argmax at each step, nothing
    else (no EOS stop, no logits processors), as `greedy_gguf(..., stop_at_eos=False)` does."""
    import torch

    out: List[int] = []
    step, past = torch.tensor([prompt_ids]), None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            result = model(input_ids=step, past_key_values=past, use_cache=True)
            past, token = result.past_key_values, int(result.logits[0, -1].argmax())
            out.append(token)
            step = torch.tensor([[token]])
    return out


def _chat_text(tokenizer, prompt: str, raw: bool):
    """The prompt as one user turn of the tokenizer's chat template (which brings its own special
    tokens), or None for a raw prompt (tokenized with the tokenizer's usual special tokens)."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def generate(student: str, prompt: str, opts: GenerateOptions = GenerateOptions()) -> str:
    """The continuation of `prompt` (new text only)."""
    _check(opts)
    path = Path(student).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _generate_gguf(path, prompt, opts)
    import torch

    from distillation.models import load_tokenizer
    from distillation.student.build import set_compile
    from distillation.student.checkpoint import load_student, read_student_config

    read_student_config(path)  # a clear error for a folder that is not a student
    if not (path / "tokenizer.json").is_file():
        raise DistillError(f"student '{path}' holds no tokenizer (tokenizer.json) to read the prompt with")
    set_compile(False)
    tokenizer = load_tokenizer(path)
    model = load_student(path).eval()
    chat = _chat_text(tokenizer, prompt, opts.raw)
    ids = tokenizer(chat or prompt, return_tensors="pt", add_special_tokens=chat is None)
    torch.manual_seed(opts.seed)
    extra = {"temperature": opts.temperature, "top_p": opts.top_p} if opts.sample else {}
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module
            **ids, max_new_tokens=opts.max_new_tokens, do_sample=opts.sample,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **extra)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _generate_gguf(path: Path, prompt: str, opts: GenerateOptions) -> str:
    llm = open_gguf(path)
    try:
        template = None if opts.raw else llm.metadata.get("tokenizer.chat_template")
        text = _render_gguf_chat(template, prompt, llm) if template else prompt
        add_bos = not template and llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        if opts.sample:
            out = llm.create_completion(ids, max_tokens=opts.max_new_tokens, temperature=opts.temperature,
                                        top_p=opts.top_p, seed=opts.seed)
            return out["choices"][0]["text"]
        return llm.detokenize(greedy_gguf(llm, ids, opts.max_new_tokens)).decode("utf-8", errors="replace")
    finally:
        llm.close()


def _render_gguf_chat(template: str, prompt: str, llm) -> str:
    """One user turn through the GGUF's own chat template, rendered by llama-cpp-python's formatter."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token(i: int) -> str:
        return llm.detokenize([i], special=True).decode("utf-8", errors="replace") if i >= 0 else ""

    formatter = Jinja2ChatFormatter(template, eos_token=token(llm.token_eos()), bos_token=token(llm.token_bos()))
    return formatter(messages=[{"role": "user", "content": prompt}]).prompt
