"""Teacher and student must share one tokenizer: checked on a probe set before any work starts.

Models often pad their embedding matrix past the tokenizer (e.g. to a multiple of 64); rows past
the tokenizer's real range are never produced by it, so two vocabularies that differ only there are
aligned to the shared real range with a warning.
"""

import warnings

from distillation.errors import DistillError

PROBE_TEXTS = (
    "To be, or not to be, that is the question:",
    "def main(argv=None):\n    return 0\n",
    "The capital of France is Paris. 1234567890 !?",
)


def check_vocab(teacher_tokenizer, teacher_vocab: int, student_tokenizer, student_vocab: int) -> int:
    """The number of leading vocabulary rows both models share; raises on any other mismatch."""
    for text in PROBE_TEXTS:
        t_ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        s_ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        if t_ids != s_ids:
            raise DistillError(f"teacher and student tokenizers disagree on {text!r}: {t_ids[:8]} vs {s_ids[:8]}")
    if teacher_vocab == student_vocab:
        return teacher_vocab
    real_t, real_s = len(teacher_tokenizer), len(student_tokenizer)
    if real_t == real_s and min(teacher_vocab, student_vocab) >= real_t:
        warnings.warn(f"teacher vocabulary {teacher_vocab} and student vocabulary {student_vocab} differ only by "
                      f"padding rows; distilling over the shared real range [0, {real_t})", stacklevel=2)
        return real_t
    raise DistillError(f"teacher and student vocabularies differ: teacher has {teacher_vocab} token ids "
                       f"(tokenizer {real_t}), student has {student_vocab} (tokenizer {real_s}); "
                       "they must share one tokenizer")
