"""The paper's Table 1 in miniature: each task's metrics on its held-out records (whole works or
modules never trained on) for FP-SFT (the teacher fine-tuned on the task, stage 0), BitNet-SFT (the
converted, stage-2 student fine-tuned with CE only) and BitDistill (stage 3 from the FP-SFT teacher),
at equal tokens, per seed; plus the loss ablation on the first task (logits only, attention only).

Per task and seed one recipe (`recipe.stages=[teacher_sft, pretrain, distill]`) gives FP-SFT and
BitDistill, and runs from its stage-2 student give BitNet-SFT and the ablation arms, so every arm
starts from the same student and learns from the same teacher. Every run is a real `distill` run.

    python -m bench tasks [--teacher miniature|smollm2-135m-instruct|PATH] [--tasks shakespeare_genre stdlib_docstring]
                          [--seeds 0 1 2] [--steps 60] [--pretrain-steps 60] [--teacher-sft-steps 120]
                          [--teacher-sft-lr LR] [--records 200] [--no-ablation] [--label TEXT] [--out DIR]
                          [--table-from-log] [-- OVERRIDE ...]

With `--out` a stopped bench loses nothing: the rerun skips every finished recipe stage and arm.
`--table-from-log` assembles the table from `results/tasks-runs.jsonl` (every finished arm is
logged at once), e.g. across invocations that each ran some seeds.

The same script runs unchanged with SmolLM2 or a larger model on a GPU (`--teacher`, plus any
override after `--`, e.g. `-- experiment=gpu`).
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ABLATION = {"BitDistill, logits only": ["distillation.attention_weight=0"],
            "BitDistill, attention only": ["distillation.logits_weight=0"]}


def _teacher(name: str) -> list:
    if name != "miniature":
        return [f"teacher.model={name}"]
    from bench.miniature import SETTINGS, build_miniature_teacher
    from distillation.cluster import init_ray
    from distillation.config import load_config
    from distillation.console import say

    cfg = load_config([f"data.max_tokens_per_source={SETTINGS['max_tokens_per_source']}"])
    init_ray(cfg.run)
    # its own 4096-token vocabulary and no chat template: records are rendered plainly
    return [f"teacher.model={build_miniature_teacher(cfg, say)}", "student.num_layers=null", "distillation.split_heads=4",
            "distillation.teacher_layer=-2", "distillation.student_layer=-2", "teacher.dtype=float32"]


def _metrics(summary: dict, who: str = "student_after") -> dict:
    return summary["heldout"][who]["task"]


def one_seed(task: str, seed: int, common: list, args, out: str, log) -> list:
    from distillation.config import load_config
    from distillation.recipe import run_recipe
    from distillation.run import run

    base = common + [f"task={task}", f"training.seed={seed}", f"training.max_steps={args.steps}",
                     f"recipe.teacher_sft_steps={args.teacher_sft_steps}", f"recipe.pretrain_steps={args.pretrain_steps}",
                     f"task.records={args.records}", "run.progress=false", f"run.output_dir={out}"]
    name = f"{task}-{seed}"
    report = run_recipe(load_config(base + ["recipe=bitdistill", f"run.name={name}"]), run)
    stages = report["stages"]
    root = Path(report["recipe_dir"])
    rows = [("FP-SFT (teacher fine-tuned)", json.loads((root / "teacher_sft" / "summary.json").read_text())),
            ("BitDistill", json.loads((root / "distill" / "summary.json").read_text()))]
    arms = {"BitNet-SFT (CE only)": ["distillation=ce_only"]}
    if task == args.tasks[0] and args.ablation:
        arms.update(ABLATION)
    for arm, choice in arms.items():
        overrides = base + choice + [f"student.checkpoint_path={stages['pretrain']['student']}",
                                     f"teacher.model={stages['teacher_sft']['student']}",
                                     f"run.name={name}-{len(rows)}"]
        done = Path(out) / f"{name}-{len(rows)}" / "summary.json"  # a finished arm of an earlier invocation
        rows.append((arm, json.loads(done.read_text()) if done.is_file() else run(load_config(overrides))))
    results = []
    for arm, summary in rows:
        row = {"task": task, "arm": arm + args.label, "seed": seed, "tokens": summary["tokens_seen"], **_metrics(summary),
               "heldout_nats": summary["heldout"]["student_after"]["loss"]}
        results.append(row)
        log(row)
    return results


def _spread(values) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(results: list) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        mine = [r for r in results if r["task"] == task]
        metrics = [k for k in mine[0] if k not in ("task", "arm", "seed", "tokens", "examples", "heldout_nats")]
        # nats per response token, not bits per byte: a label word's EOS is a token of no bytes
        lines += [f"| {task}: arm | tokens | " + " | ".join(metrics) + " | held-out nats/token (responses) |",
                  "|---|---|" + "---|" * (len(metrics) + 1)]
        for arm in dict.fromkeys(r["arm"] for r in mine):
            rows = [r for r in mine if r["arm"] == arm]
            lines.append(f"| {arm} | {statistics.median(r['tokens'] for r in rows):,.0f} | "
                         + " | ".join(_spread([r[m] for r in rows]) for m in metrics)
                         + f" | {_spread([r['heldout_nats'] for r in rows])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="miniature")
    parser.add_argument("--tasks", nargs="+", default=["shakespeare_genre", "stdlib_docstring"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60, help="stage 0 and stage 3 (each arm) optimizer steps")
    parser.add_argument("--pretrain-steps", type=int, default=60)
    # The paper's FP16-SFT teacher is trained to convergence: a teacher worse at the task than the
    # students it teaches measures nothing (at the recipe's lr 1e-4 for 60 steps, the miniature's was)
    parser.add_argument("--teacher-sft-steps", type=int, default=120)
    parser.add_argument("--teacher-sft-lr", type=float, help="default: 1e-3 for the miniature (trained at 3e-3), "
                                                              "else recipe.teacher_sft_lr")
    parser.add_argument("--records", type=int, default=200, help="held-out records each metric is computed on")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="the loss ablation arms on the first task")
    parser.add_argument("--label", default="", help="appended to every arm's name in the log and table, e.g. what "
                                                     "the overrides after -- changed")
    parser.add_argument("--log", default=str(Path(__file__).with_name("results") / "tasks-runs.jsonl"))
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder): a rerun skips the stages "
                                      "and arms that finished, whatever overrides they ran with, so give a run "
                                      "under other overrides (--label) a DIR of its own")
    parser.add_argument("--table-from-log", action="store_true",
                        help="run nothing: the table of the latest logged row of each task, arm and seed")
    parser.add_argument("overrides", nargs="*", help="after --: any distill override for every run")
    args = parser.parse_args(argv)

    def log(row):
        Path(args.log).parent.mkdir(exist_ok=True)
        with open(args.log, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{row['task']} {row['arm']} seed {row['seed']}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)

    if args.table_from_log:
        latest = {(r["task"], r["arm"], r["seed"]): r for r in map(json.loads, Path(args.log).read_text().splitlines())}
        results = [r for r in latest.values() if r["task"] in args.tasks and r["seed"] in args.seeds]
        text = table(results)
        print(text)
        return {"table": text, "results": results, "teacher": args.teacher, "seeds": args.seeds, "from_log": args.log}
    sft_lr = args.teacher_sft_lr or (1e-3 if args.teacher == "miniature" else None)
    common = _teacher(args.teacher) + ([f"recipe.teacher_sft_lr={sft_lr}"] if sft_lr else []) + list(args.overrides)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        for task in args.tasks:
            for seed in args.seeds:
                results += one_seed(task, seed, common, args, out, log)
    text = table(results)
    print(text)
    return {"table": text, "results": results, "teacher": args.teacher, "seeds": args.seeds, "steps": args.steps,
            "teacher_sft_steps": args.teacher_sft_steps, "teacher_sft_lr": sft_lr,
            "pretrain_steps": args.pretrain_steps, "records": args.records}


if __name__ == "__main__":
    main()
