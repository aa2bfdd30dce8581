"""Training metrics: Prometheus gauges (Ray dashboard), the logging window, the JSON-lines files and
loss-curve PNG next to the checkpoints. The actor the workers push rows to is roles/metrics_board.py."""

import json
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence

from distillation.config.schema import DistillationConfig
from distillation.losses.combined import LOSS_COMPONENTS


class TrainingGauges:
    """`ray.util.metrics` gauges, exported by every node's metrics agent to the dashboard and Prometheus."""

    def __init__(self, sources: Sequence[str]):
        from ray.util.metrics import Gauge

        self.sources = list(sources)
        self.loss = Gauge("distill_loss", "loss components, averaged over the logging window", tag_keys=("component",))
        self.scalars = {key: Gauge(f"distill_{key}", doc) for key, doc in (
            ("tokens_per_s", "student training tokens per second"), ("lr", "learning rate"),
            ("grad_norm", "gradient norm before clipping"),
            ("data_wait_s", "seconds the trainer waited for teacher-annotated data in the window"),
            ("nan_skipped", "optimizer steps skipped for a non-finite gradient"), ("step", "optimizer step"),
            ("quant_mix", "the quantisation warm-up's mix in the step (1: fully ternary)"))}
        self.mixture = Gauge("distill_mixture_weight", "sampling weight per source", tag_keys=("source",))
        self.task = Gauge("distill_task", "the task's metrics on its held-out records (training.eval_every)",
                          tag_keys=("metric",))

    def set(self, row: dict) -> None:
        for component in LOSS_COMPONENTS:
            self.loss.set(row[component], tags={"component": component})
        for key, gauge in self.scalars.items():
            gauge.set(row[key])
        for name, weight in zip(self.sources, row["mixture"]):
            self.mixture.set(weight, tags={"source": name})
        for key in (k for k in row if k.startswith("task_")):
            self.task.set(row[key], tags={"metric": key.removeprefix("task_")})


class LogWindow:
    """Loss components, tokens and time waiting for data, averaged over the micro-steps since the
    last logged row; the row also carries what every row must (step, lr, weighted terms)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums, self.n, self.tokens, self.data_wait_s = dict.fromkeys(LOSS_COMPONENTS, 0.0), 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, losses: dict, tokens: int, data_wait_s: float) -> None:
        for key in LOSS_COMPONENTS:
            self.sums[key] += losses[key]
        self.n += 1
        self.tokens += tokens
        self.data_wait_s += data_wait_s

    def row(self, dcfg: DistillationConfig, **fields) -> dict:
        mean = {key: value / max(self.n, 1) for key, value in self.sums.items()}
        row = {**fields, "tokens_per_s": self.tokens / (time.perf_counter() - self.start),
               "data_wait_s": self.data_wait_s, **mean,
               "ce_weighted": dcfg.ce_weight * mean["ce"], "logits_kl_weighted": dcfg.logits_weight * mean["logits_kl"],
               "attention_weighted": dcfg.attention_weight * mean["attention"]}
        return row


WEIGHTED_TERMS = (("ce_weighted", "CE"), ("logits_kl_weighted", "lambda * L_LD"), ("attention_weighted", "gamma * L_AD"))
DOMINANCE_RATIO = 100.0


def dominance_warning(row: dict) -> Optional[str]:
    """A warning when one weighted loss term is more than 100x all the others together: what a
    miscalibrated lambda or gamma looks like (the other terms then barely move the student)."""
    terms = {label: abs(row.get(key) or 0.0) for key, label in WEIGHTED_TERMS}
    label, largest = max(terms.items(), key=lambda kv: kv[1])
    rest = sum(terms.values()) - largest
    if rest > 0 and largest > DOMINANCE_RATIO * rest:
        return (f"{label} is {largest / rest:.0f}x the other loss terms together; the others barely train the "
                f"student (check distillation.logits_weight / attention_weight)")
    return None


def append_jsonl(path: Path, rows: List[dict]) -> None:
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def drop_rows_after(path: Path, step: int) -> None:
    """Keep only the rows of steps <= `step` (a resumed run's checkpoint: what a killed attempt logged
    after it is redone), streaming the file through a sibling and replacing it atomically."""
    path = Path(path)
    if not path.is_file():
        return
    staging = path.with_name(f".{path.name}.tmp")
    with open(path) as source, open(staging, "w") as kept:
        for line in source:
            if line.strip() and json.loads(line).get("step", 0) <= step:
                kept.write(line)
    os.replace(staging, path)


def plot_losses(rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("loss", "total"), ("ce", "CE"), ("logits_kl_weighted", "lambda * L_LD"),
            ("attention_weighted", "gamma * L_AD")]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key, label in keys:
        values = [r.get(key) for r in rows]
        if any(v for v in values):
            ax.plot(steps, values, label=label)  # type: ignore[arg-type]  # matplotlib draws None as a gap; stubs want numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_jsonl(path: Path) -> List[dict]:
    """Rows of a JSON-lines file; a step written twice (redone after a restart) keeps its last row."""
    if not Path(path).is_file():
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if rows and "step" in rows[0]:
        latest = {(r["step"], r.get("rank", 0)): r for r in rows}
        rows = [latest[k] for k in sorted(latest)]
    return rows


def plot_mixture(history: List[dict], names: Sequence[str], max_steps: int, path: Path) -> None:
    """Sampling weight per source over optimizer steps (a step function: each update holds until the next)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [e["step"] for e in history] + [max_steps]
    for i, name in enumerate(names):
        values = [e["weights"][i] for e in history]
        ax.step(steps, values + values[-1:], where="post", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sampling weight")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
