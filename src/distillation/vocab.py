"""Teacher and student must share one tokenizer: checked on a probe set before any work starts."""

from distillation.errors import DistillError

PROBE_TEXTS = (
    "To be, or not to be, that is the question:",
    "def main(argv=None):\n    return 0\n",
    "The capital of France is Paris. 1234567890 !?",
)


def check_vocab(teacher_tokenizer, teacher_vocab: int, student_tokenizer, student_vocab: int) -> None:
    if teacher_vocab != student_vocab:
        raise DistillError(f"teacher and student vocabularies differ: teacher has {teacher_vocab} token ids, "
                           f"student has {student_vocab}; they must share one tokenizer")
    for text in PROBE_TEXTS:
        t_ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        s_ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        if t_ids != s_ids:
            raise DistillError(f"teacher and student tokenizers disagree on {text!r}: {t_ids[:8]} vs {s_ids[:8]}")
