"""The defaults sweep: which tau, teacher signal, lambda, gamma, layer pairing and lr give the lowest
held-out bits/byte for the default job (teacher SmolLM2-135M, the CPU-default 8-layer BitNet student).

Each arm is a real `distill` run (Ray Serve teacher, Ray Data, Ray Train) from the same freshly
converted student, seed and rows, changed by its overrides only. Two metrics: bits/byte on the
held-out split and on two English texts no run trains on (bench/unseen.py), so the choice is not
tuned to the held-out split alone. `--budget 4` multiplies the steps (4x the tokens).

    python -m bench sweep [--arms NAME ...] [--budget 1] [--seeds 0] [--table-from-log]

Every finished arm is appended to `results/sweep-runs.jsonl` at once; `--table-from-log` runs
nothing and assembles the table of `--arms` at `--budget` from it (the rows scored on the same
held-out set as the latest row), e.g. across invocations that each ran some seeds.

The stage-2 arms split the same steps between CE-only continued pre-training and distillation from
its student (the recipe's stages 2 and 3), so every arm sees the same number of tokens.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

LOGITS = ["distillation=logits_only"]
ATTN = ["distillation=bitdistill"]
SAME_LAYER = ["distillation.teacher_layer=6", "distillation.student_layer=6"]  # student layer 6 began as it
ARMS = {
    "sft": ["distillation=ce_only"],
    "paper (sampled, tau 5, gamma 1e5)": ATTN + ["teacher.signal=sampled"],
    "hidden tau 1": LOGITS + ["teacher.signal=hidden", "distillation.temperature=1"],
    "hidden tau 2": LOGITS + ["teacher.signal=hidden", "distillation.temperature=2"],
    "hidden tau 5": LOGITS + ["teacher.signal=hidden", "distillation.temperature=5"],
    "sampled tau 1": LOGITS + ["teacher.signal=sampled", "distillation.temperature=1"],
    "topk tau 1": LOGITS + ["teacher.signal=topk", "distillation.temperature=1"],
    "hidden tau 1, lambda 1": LOGITS + ["teacher.signal=hidden", "distillation.temperature=1",
                                        "distillation.logits_weight=1"],
    "hidden tau 1 + attn same layer, gamma 1e5": ATTN + ["teacher.signal=hidden", "distillation.temperature=1"]
    + SAME_LAYER,
    "hidden tau 1 + attn cross layer (-6/-2), gamma 1e5": ATTN + ["teacher.signal=hidden",
                                                                 "distillation.temperature=1",
                                                                 "distillation.teacher_layer=-6",
                                                                 "distillation.student_layer=-2"],
    "hidden tau 1 + attn same layer, gamma 1e4": ATTN + ["teacher.signal=hidden", "distillation.temperature=1",
                                                        "distillation.attention_weight=1e4"] + SAME_LAYER,
    "hidden tau 1, lr 3e-3": LOGITS + ["teacher.signal=hidden", "distillation.temperature=1", "training.lr=3e-3"],
    "hidden tau 1, lr 3e-4": LOGITS + ["teacher.signal=hidden", "distillation.temperature=1", "training.lr=3e-4"],
    # Issue 25, one factor at a time from the current defaults (hidden, tau 1, lambda 10, + attention
    # on the same layer, lr 1e-3); WARMUP is a third of the arm's steps. gamma was 1e5 for every
    # "defaults" row in results/sweep-runs.jsonl; the sweep made it 1e4 (the "gamma 1e4" rows).
    "defaults": [],
    "defaults, quant warm-up linear": ["student.quant_warmup_steps=WARMUP"],
    "defaults, quant warm-up sigmoid": ["student.quant_warmup_steps=WARMUP", "student.quant_warmup_schedule=sigmoid"],
    "sft, quant warm-up linear": ["distillation=ce_only", "student.quant_warmup_steps=WARMUP"],
    "defaults, lr 3e-3": ["training.lr=3e-3"],
    "defaults, lr 3e-4": ["training.lr=3e-4"],
    "defaults, lambda 1": ["distillation.logits_weight=1"],
    "defaults, lambda 30": ["distillation.logits_weight=30"],
    "defaults, KD without CE": ["distillation.ce_weight=0"],
    "defaults, tau 2": ["distillation.temperature=2"],
    "defaults, gamma 1e4": ["distillation.attention_weight=1e4"],
    "defaults, gamma 1e6": ["distillation.attention_weight=1e6"],
    "defaults, gamma 1e3": ["distillation.attention_weight=1e3"],
    "defaults, gamma 0": ["distillation.attention_weight=0"],
    # The depth-only reference: the same 8 layers in full precision, same tokens (what truncation alone
    # costs), at the ternary arms' lr.
    "full precision, defaults": ["student.ternary=false"],
    # Issue 25: stage 2 (CE only, the paper's continued pre-training) for a share of the steps, then
    # the defaults from its student for the rest (recipe.stages=[pretrain, distill]): equal tokens.
    "stage 2 for 25%, then the defaults": ["SPLIT=0.25"],
    "stage 2 for 50%, then the defaults": ["SPLIT=0.5"],
}
DEFAULT_STEPS = 30  # the schema default (experiment=cpu_default)


def run_arm(name: str, overrides: list, seed: int, steps: int, out: str, unseen) -> dict:
    from distillation.config import load_config
    from distillation.models import load_tokenizer
    from distillation.run import run
    from distillation.student import load_student

    overrides = [o.replace("WARMUP", str(steps // 3)) for o in overrides]
    common = [f"training.seed={seed}", "run.progress=false", f"run.output_dir={out}",
              f"run.name=arm-{abs(hash((name, seed, steps)))}"]
    split = next((float(o.split("=")[1]) for o in overrides if o.startswith("SPLIT=")), None)
    if split is None:
        summary = run(load_config(overrides + common + [f"training.max_steps={steps}"]))
    else:
        summary = _split_run(overrides, common, steps, split)
    student_dir = summary["student_checkpoint"]
    scores = unseen(load_student(student_dir, dense="student.ternary=false" in overrides), load_tokenizer(student_dir))
    first, last = summary["first"], summary["last"]
    return {"arm": name, "seed": seed, "steps": steps, "tokens": summary["tokens_seen"],
            "heldout_bpb": summary["heldout"]["student_after"]["bits_per_byte"],
            "teacher_heldout_bpb": (summary["heldout"]["teacher"] or {}).get("bits_per_byte"),
            "unseen_bpb": scores, "wall_s": summary["wall_s"],
            "loss_terms_first": {k: first.get(k) for k in ("ce", "logits_kl", "attention")},
            "loss_terms_last": {k: last.get(k) for k in ("ce", "logits_kl", "attention")}}


def _split_run(overrides: list, common: list, steps: int, split: float) -> dict:
    """Stage 2 for `split` of the steps, stage 3 for the rest: stage 3's summary, with the tokens of both."""
    from distillation.config import load_config
    from distillation.recipe import run_recipe
    from distillation.run import run

    pretrain = round(steps * split)
    report = run_recipe(load_config([o for o in overrides if not o.startswith("SPLIT=")] + common + [
        "recipe.stages=[pretrain,distill]", f"recipe.pretrain_steps={pretrain}",
        f"training.max_steps={steps - pretrain}"]), run)
    root = Path(report["recipe_dir"])
    first, last = (json.loads((root / stage / "summary.json").read_text()) for stage in ("pretrain", "distill"))
    return {**last, "tokens_seen": first["tokens_seen"] + last["tokens_seen"]}


def _fmt(values: list) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(results: list, teacher: dict) -> str:
    """One row per (arm, steps), median [min, max] over seeds. Gap closed per seed against the SFT arm
    of the same seed and steps: (SFT - arm) / (SFT - teacher), on each metric."""
    sft = {(r["seed"], r["steps"]): r for r in results if r["arm"] == "sft"}
    lines = ["| arm | steps | seeds | held-out bits/byte | gap closed (held-out) | unseen English bits/byte | "
             "gap closed (unseen) | L_AD per term, first -> last |",
             "|---|---|---|---|---|---|---|---|",
             f"| teacher SmolLM2-135M | - | - | {teacher['heldout']:.3f} | - | {teacher['unseen']:.3f} | - | - |"]
    groups: dict = {}
    for r in results:
        groups.setdefault((r["arm"], r["steps"]), []).append(r)
    for (arm, steps), rows in groups.items():
        gaps = {"heldout": [], "unseen": []}
        for r in rows:
            base = sft.get((r["seed"], steps))
            if base is not None and arm != "sft":
                gaps["heldout"].append((base["heldout_bpb"] - r["heldout_bpb"]) / (base["heldout_bpb"] - teacher["heldout"]))
                gaps["unseen"].append((base["unseen_bpb"]["mean"] - r["unseen_bpb"]["mean"])
                                      / (base["unseen_bpb"]["mean"] - teacher["unseen"]))
        attn = rows[0]["loss_terms_first"]["attention"], rows[0]["loss_terms_last"]["attention"]
        attn = f"{attn[0]:.4f} -> {attn[1]:.4f}" if attn[0] else "-"
        lines.append(f"| {arm} | {steps} | {','.join(str(r['seed']) for r in rows)} | "
                     f"{_fmt([r['heldout_bpb'] for r in rows])} | {_fmt(gaps['heldout']) if gaps['heldout'] else '-'} | "
                     f"{_fmt([r['unseen_bpb']['mean'] for r in rows])} | {_fmt(gaps['unseen']) if gaps['unseen'] else '-'} | "
                     f"{attn} |")
    return "\n".join(lines)


def from_log(log: str, arms: list, steps: int, seeds: list) -> list:
    """The latest logged row of each (arm, seed) at `steps`, among the rows scored on the same held-out
    set as the log's last row that scored the teacher (older rows came from an earlier data path,
    issue 14); a stage-2 split arm scores no teacher and is kept."""
    rows = [json.loads(line) for line in Path(log).read_text().splitlines()]
    held_out = [r["teacher_heldout_bpb"] for r in rows if r["teacher_heldout_bpb"] is not None][-1]
    latest = {(r["arm"], r["seed"]): r for r in rows if r["steps"] == steps and r["seed"] in seeds
              and (r["teacher_heldout_bpb"] is None or abs(r["teacher_heldout_bpb"] - held_out) < 1e-9)}
    return [latest[(arm, seed)] for arm in arms for seed in seeds if (arm, seed) in latest]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help="arm names (default: all)")
    parser.add_argument("--budget", type=int, default=1, help="multiple of the default job's steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--log", default=str(Path(__file__).with_name("results") / "sweep-runs.jsonl"),
                        help="every finished arm is appended here at once")
    parser.add_argument("--table-from-log", action="store_true", help="run nothing: the table from --log")
    args = parser.parse_args(argv)
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    from bench.unseen import score_unseen
    from distillation.config import load_config
    from distillation.models import load_causal_lm, load_tokenizer, resolve_model

    cache_dir = load_config().data.cache_dir
    teacher_dir = resolve_model(load_config().teacher.model, cache_dir)
    teacher_unseen = score_unseen(load_causal_lm(teacher_dir), load_tokenizer(teacher_dir), cache_dir)
    if args.table_from_log:
        results = from_log(args.log, args.arms, DEFAULT_STEPS * args.budget, args.seeds)
        if not results:
            parser.error(f"no rows of {args.arms} at budget {args.budget}x, seeds {args.seeds} in {args.log}")
        teacher = {"heldout": next(r["teacher_heldout_bpb"] for r in results if r["teacher_heldout_bpb"]),
                   "unseen": teacher_unseen["mean"]}
        text = table(results, teacher)
        print(text)
        return {"table": text, "teacher": teacher, "teacher_unseen": teacher_unseen, "results": results,
                "budget": args.budget, "seeds": args.seeds, "from_log": args.log}

    def unseen(model, tokenizer):
        return score_unseen(model, tokenizer, cache_dir)

    results = []
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            for name in args.arms:
                result = run_arm(name, ARMS[name], seed, DEFAULT_STEPS * args.budget, out, unseen)
                results.append(result)
                with open(args.log, "a") as log:
                    log.write(json.dumps(result) + "\n")
                print(f"{name} seed {seed}: held-out {result['heldout_bpb']:.3f}, unseen "
                      f"{result['unseen_bpb']['mean']:.3f} bits/byte", flush=True)
    teacher = {"heldout": results[0]["teacher_heldout_bpb"], "unseen": teacher_unseen["mean"]}
    text = table(results, teacher)
    print(text)
    return {"table": text, "teacher": teacher, "teacher_unseen": teacher_unseen, "results": results,
            "budget": args.budget, "seeds": args.seeds}


if __name__ == "__main__":
    main()
