"""Training metrics: a tiny Ray actor the workers push to (the driver's progress bar reads it), a
JSON-lines file and a loss-curve PNG next to the checkpoints."""

import json
from pathlib import Path
from typing import List

import ray


@ray.remote(num_cpus=0)
class MetricsBoard:
    def __init__(self):
        self.rows: List[dict] = []

    def push(self, row: dict) -> None:
        self.rows.append(row)

    def since(self, index: int) -> List[dict]:
        return self.rows[index:]


def append_jsonl(path: Path, rows: List[dict]) -> None:
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


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
            ax.plot(steps, values, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
