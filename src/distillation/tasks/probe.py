"""A task's held-out examples, read once in the driver (the test source's first units, enough for
`task.records`, spread evenly), and scoring a model on them wherever the probe is sent."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from distillation.config.schema import DataConfig, TaskConfig
from distillation.errors import DistillError
from distillation.tasks import Example

READ_FACTOR = 4  # records read per record scored, to spread the scored ones over more of the source


@dataclass(frozen=True)
class TaskProbe:
    """What the held-out task and rank 0 score a model with (the task's examples and settings)."""
    name: str
    examples: Tuple[Example, ...]
    metrics: Tuple[str, ...]
    labels: Tuple[str, ...]
    chat_template: str  # data.chat_template: the examples render as training rendered the records
    max_new_tokens: int
    tokenizer: str  # a ModelSource: resolved where the probe is scored

    def score(self, model) -> Dict[str, float]:
        from distillation.data.records import uses_chat_template
        from distillation.models import cached_tokenizer
        from distillation.tasks.metrics import score_task

        tokenizer = cached_tokenizer(self.tokenizer)  # every training.eval_every on rank 0: loaded once
        return score_task(model, tokenizer, self.examples, self.metrics, uses_chat_template(tokenizer, self.chat_template),
                          self.labels, self.max_new_tokens)


def task_probe(task: TaskConfig, d: DataConfig, tokenizer) -> Optional[TaskProbe]:
    """The probe of `task` (None without one); a held-out record whose answer is not one of the
    task's labels is a one-line error naming its file and record."""
    if task.name is None:
        return None
    from distillation.data.corpus import source_fields
    from distillation.data.records import split_record
    from distillation.data.sources import open_source, read_unit

    s = task.test  # a record source (the loader's check)
    spec = open_source(s.name, s.kind, s.path, d.cache_dir, split=s.split, fields=source_fields(s, task.labels))
    found: List[Example] = []
    for unit in spec.units:
        for doc in read_unit(spec, unit):  # an answer outside task.labels: an error naming the file and line
            assert doc.turns is not None  # a record source (the loader's check)
            found.append(Example(*split_record(doc.turns)))
        if len(found) >= READ_FACTOR * task.records:
            break
    if not found:
        raise DistillError(f"task '{task.name}': its test source '{s.name}' holds no records")
    step = max(1, len(found) // task.records)
    return TaskProbe(task.name, tuple(found[::step][:task.records]), tuple(task.metrics), tuple(task.labels),
                     d.chat_template, task.max_new_tokens, tokenizer)
