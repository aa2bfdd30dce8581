"""Table A: BitDistill's Table 1 and loss ablation in miniature, on real text.

Teacher SmolLM2-135M (full precision) against BitNet students (the CPU default: its first 8 layers,
converted) trained with equal token budgets and seeds through the real pipeline:
BitNet-SFT (CE only), BitDistill logits only, BitDistill logits + attention, each with and without
a short stage-2 continued pre-training (CE only on the same mixture) before it. Metric: bits per byte
on the held-out documents (never trained on). "Gap closed" = (SFT - arm) / (SFT - teacher), per
seed, against the SFT arm with the same stage-2 setting. Goal: BitDistill closes at least half.

    python -m bench quality [--seeds 0 1] [--steps 20] [--stage2-steps 10]
"""

import argparse
import statistics
import tempfile

ARMS = {"sft": "distillation=ce_only", "logits": "distillation=logits_only", "logits+attention": "distillation=bitdistill"}


def _run(overrides):
    from distillation.config import load_config
    from distillation.run import run

    return run(load_config(overrides + ["run.progress=false"]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stage2-steps", type=int, default=10)
    args = parser.parse_args(argv)
    bpb, teacher = {}, None
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            common = [f"training.seed={seed}", f"run.output_dir={out}"]
            stage2 = _run(common + ["distillation=ce_only", f"training.max_steps={args.stage2_steps}",
                                    f"run.name=stage2-{seed}"])
            for stage in ("none", "stage2"):
                start = [f"student.checkpoint_path={stage2['student_checkpoint']}"] if stage == "stage2" else []
                for arm, choice in ARMS.items():
                    summary = _run(common + start + [choice, f"training.max_steps={args.steps}",
                                                     f"run.name={arm}-{stage}-{seed}"])
                    bpb.setdefault((arm, stage), []).append(summary["heldout"]["student_after"]["bits_per_byte"])
                    teacher = summary["heldout"]["teacher"]["bits_per_byte"]
                    print(f"seed {seed} {arm} ({stage}): {bpb[(arm, stage)][-1]:.3f} bits/byte", flush=True)
    lines = [f"| student ({args.steps} steps x 4 x 256 tokens) | stage 2 | held-out bits/byte (median [min, max]) "
             f"| gap to teacher closed vs SFT |", "|---|---|---|---|",
             f"| teacher SmolLM2-135M (full precision) | - | {teacher:.3f} | - |"]
    rows = {}
    for (arm, stage), values in bpb.items():
        sft = bpb[("sft", stage)]
        closed = [(s - v) / (s - teacher) for s, v in zip(sft, values)]
        rows[f"{arm}/{stage}"] = {"bits_per_byte": values, "gap_closed": closed}
        gap = "-" if arm == "sft" else f"{statistics.median(closed):.2f} [{min(closed):.2f}, {max(closed):.2f}]"
        lines.append(f"| {arm} | {f'yes ({args.stage2_steps} steps)' if stage == 'stage2' else 'no'} | "
                     f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}] | {gap} |")
    table = "\n".join(lines)
    print(table)
    return {"table": table, "teacher_bits_per_byte": teacher, "arms": rows, "seeds": args.seeds,
            "steps": args.steps, "stage2_steps": args.stage2_steps}


if __name__ == "__main__":
    main()
