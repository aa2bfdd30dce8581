"""The run's teacher, resolved and checked against the student before anything starts."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from distillation.config.schema import DistillationConfig, StudentConfig, TeacherConfig
from distillation.errors import DistillError
from distillation.models import ModelRef, load_tokenizer, pin_model
from distillation.vocab import check_vocab


@dataclass(frozen=True)
class ResolvedTeacher:
    model_dir: Path  # on the driver's node
    ref: ModelRef  # what replicas, workers and readers resolve on their own nodes
    tokenizer: Any  # the one tokenizer teacher and student share (vocab.check_vocab)
    vocab_size: int  # the shared real vocabulary
    qkv_layer: Optional[int]  # the layer whose Q/K/V the teacher returns; None without attention distillation
    student_dir: Optional[Path] = None  # the student's starting weights on the driver's node
    student_ref: Optional[ModelRef] = None  # those weights as workers resolve them (None: a saved student's path)


def config_vocab(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def student_source(student: StudentConfig, cache_dir: str) -> tuple:
    """(ModelRef or None, the folder here) of the student's starting weights: a saved student (its
    path, None), or the model stage 1 converts, pinned as the teacher is."""
    if not student.checkpoint_path:
        return pin_model(student.init_from, cache_dir)
    path = Path(student.checkpoint_path).expanduser()
    if not (path / "config.json").is_file():
        raise DistillError(f"student checkpoint '{path}' does not exist or has no config.json")
    return None, path


def resolve_teacher(t: TeacherConfig, student: StudentConfig, d: DistillationConfig, cache_dir: str) -> ResolvedTeacher:
    """The teacher folder, the shared tokenizer and vocabulary, and the Q/K/V layer, checked against the student."""
    ref, teacher_dir = pin_model(t.model, cache_dir)
    tokenizer = load_tokenizer(teacher_dir, t.trust_remote_code)
    student_ref, student_dir = student_source(student, cache_dir)
    student_tok_dir = student_dir if (student_dir / "tokenizer.json").is_file() else teacher_dir
    vocab_size = check_vocab(tokenizer, config_vocab(teacher_dir), load_tokenizer(student_tok_dir),
                             config_vocab(student_dir))
    qkv_layer = d.teacher_layer if d.attention_weight > 0 else None
    return ResolvedTeacher(teacher_dir, ref, tokenizer, vocab_size, qkv_layer, student_dir, student_ref)


def cache_signature(t: TeacherConfig, temperature: float, teacher: ResolvedTeacher, memo_dir: str) -> dict:
    from distillation.teachers.cache_store import signal_settings, teacher_signature

    return teacher_signature(teacher.model_dir, signal_settings(t, temperature, teacher.qkv_layer, teacher.vocab_size),
                             memo_dir=memo_dir)


def check_cache(t: TeacherConfig, temperature: float, teacher: ResolvedTeacher, memo_dir: str) -> None:
    """A replay-only cached teacher needs its cache to exist: say so before anything starts."""
    if t.kind != "cached" or t.write_through or not t.cache_dir:
        return
    from distillation.teachers.cache_store import TeacherCache

    TeacherCache(t.cache_dir, cache_signature(t, temperature, teacher, memo_dir), create=False)
