"""Influence-weighted mixing against uniform mixing: tokens to reach uniform's final target loss.

Sources {Shakespeare, Python standard library, Python docs}; the target is held-out Shakespeare
(held-out documents, disjoint from the probe documents influence scores against). Each arm is a
real `distill` run on a local Ray cluster (Ray Data pipeline, Mixture actor, Ray Train), CE only
(stage 2: the mixture is what is measured, and no teacher keeps the CPU for the student), from the
same converted SmolLM2 student and seed. Uniform's held-out Shakespeare loss at the end of its budget
is the target; the influence arm's tokens to reach it (interpolated between evaluations) over
uniform's budget is the ratio. Several seeds; median and spread.

    python -m bench mixture [--seeds 0 1 2] [--steps 30]
"""

import argparse
import json
import statistics
import tempfile

import numpy as np

from distillation.config import load_config
from distillation.run import run

TARGET = "eval_shakespeare"


def arm(influence: bool, seed: int, steps: int, out: str) -> list:
    overrides = ["distillation=ce_only", f"training.max_steps={steps}", "training.batch_size=8", "data.seq_len=128",
                 "training.num_threads=2", "training.cpus_per_worker=2", "run.num_cpus=2", "student.num_layers=4",
                 "training.eval_every=3", "data.heldout_sequences=8", f"training.seed={seed}", "run.progress=false",
                 f"run.output_dir={out}", f"run.name={'influence' if influence else 'uniform'}-{seed}",
                 f"influence.enabled={str(influence).lower()}", "influence.update_interval=3",
                 "influence.delay_steps=1"]
    summary = run(load_config(overrides))
    return [(r["tokens"], r[TARGET]) for r in
            (json.loads(line) for line in open(summary["metrics"])) if TARGET in r], summary["mixture"]


def tokens_to_reach(curve: list, target: float) -> float:
    """First token count where the loss curve reaches `target`, linearly interpolated; inf if never."""
    prev_tokens, prev_loss = 0, None
    for tokens, loss in curve:
        if loss <= target:
            if prev_loss is None:
                return tokens
            return prev_tokens + (prev_loss - target) / (prev_loss - loss) * (tokens - prev_tokens)
        prev_tokens, prev_loss = tokens, loss
    return float("inf")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            uniform, _ = arm(False, seed, args.steps, out)
            weighted, history = arm(True, seed, args.steps, out)
            target = uniform[-1][1]
            ratio = tokens_to_reach(weighted, target) / uniform[-1][0]
            results.append({"seed": seed, "uniform_final": target, "influence_final": weighted[-1][1],
                            "ratio": ratio, "uniform_curve": uniform, "influence_curve": weighted,
                            "weights_start": history[0]["weights"], "weights_end": history[-1]["weights"]})
            print(f"seed {seed}: uniform final {target:.3f}, influence final {weighted[-1][1]:.3f}, "
                  f"tokens ratio {ratio:.2f}, weights {np.round(history[-1]['weights'], 2).tolist()}", flush=True)
    ratios = [r["ratio"] for r in results]
    lines = ["| arm | held-out Shakespeare loss at budget (median) | tokens to uniform's final loss |", "|---|---|---|",
             f"| uniform | {statistics.median(r['uniform_final'] for r in results):.3f} | 1.00x (by definition) |",
             f"| influence | {statistics.median(r['influence_final'] for r in results):.3f} | "
             f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] over {len(ratios)} seeds |"]
    table = "\n".join(lines)
    print(table)
    return {"table": table, "runs": results}
