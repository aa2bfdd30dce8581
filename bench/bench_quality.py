"""Table A: does BitDistill beat plain training of the ternary student? Two scales, one code path.

- **miniature**, the whole recipe: a small full-precision Llama trained here (bench/miniature.py,
  cached) is the teacher; stage 1 converts it at the same depth to BitNet; stage 2 continues
  pre-training with CE; stage 3 arms at equal tokens from that one stage-2 student: BitNet-SFT (CE
  only), logits only, attention only, both (the paper's loss ablation).
- **smollm2**: teacher SmolLM2-135M, the CPU-default student (its first 8 layers, converted), the
  default job's budget: BitNet-SFT against BitDistill with the default settings.
- **gpu**: the same two arms with the full-depth student and `experiment=gpu` on one GPU, 4M real
  tokens per arm (`--gpu-tokens`): the larger-budget point, whenever a GPU is available.

Every arm is a real `distill` run (Ray Serve teacher, Ray Data, Ray Train). Metrics: bits/byte on
the held-out documents and on two English texts no run trains on (bench/unseen.py). Gap closed =
(SFT - arm) / (SFT - teacher), per seed against the SFT arm of the same seed; median and [min, max].

    python -m bench quality [--scale miniature smollm2 gpu] [--seeds 0 1 2] [--tokens 500000] [--arms SFT "1e4"]
                            [--gpu-tokens 4000000]
"""

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

MINI_ARMS = {"BitNet-SFT (CE only)": ["distillation=ce_only"],
             "BitDistill, logits only": ["distillation=logits_only"],
             "BitDistill, attention only": ["distillation=bitdistill", "distillation.logits_weight=0"],
             "BitDistill, logits + attention": ["distillation=bitdistill"],
             # gamma 1e5 suits SmolLM2's relations; the miniature's (192 wide, split 4 ways) are larger,
             # and there gamma * L_AD starts at 70x CE and KL together (the dominance warning)
             "BitDistill, attention only, gamma 1e4": ["distillation=bitdistill", "distillation.logits_weight=0",
                                                       "distillation.attention_weight=1e4"],
             "BitDistill, logits + attention, gamma 1e4": ["distillation=bitdistill",
                                                           "distillation.attention_weight=1e4"]}
SMOL_ARMS = {"BitNet-SFT (CE only)": ["distillation=ce_only"], "BitDistill (defaults)": ["distillation=bitdistill"]}
MINI_BATCH, MINI_FILL = 16, 0.85  # rows per step; real tokens per row position (one document per row)
GPU_BATCH, GPU_SEQ = 16, 2048


def _run(overrides: list, unseen) -> dict:
    from distillation.config import load_config
    from distillation.models import load_tokenizer
    from distillation.run import run
    from distillation.student import load_student

    summary = run(load_config(overrides + ["run.progress=false"]))
    student = summary["student_checkpoint"]
    return {"summary": summary, "heldout_bpb": summary["heldout"]["student_after"]["bits_per_byte"],
            "unseen_bpb": unseen(load_student(student), load_tokenizer(student))["mean"]}


def _mini_common(teacher_dir: Path, out: str) -> list:
    from bench.miniature import SETTINGS

    return [f"teacher.model={teacher_dir}", "student.num_layers=null", f"run.output_dir={out}",
            f"data.max_tokens_per_source={SETTINGS['max_tokens_per_source']}", f"training.batch_size={MINI_BATCH}",
            f"data.teacher_batch_size={MINI_BATCH}", "distillation.split_heads=4",
            "distillation.teacher_layer=-2", "distillation.student_layer=-2", "training.warmup_steps=10",
            "teacher.dtype=float32"]  # a small teacher: full precision costs little


def miniature(seeds, tokens: int, out: str, log, arms=None) -> dict:
    from bench.miniature import SETTINGS, build_miniature_teacher
    from bench.unseen import score_unseen
    from distillation.cluster import init_ray
    from distillation.config import load_config
    from distillation.console import say
    from distillation.models import load_causal_lm, load_tokenizer

    cfg = load_config([f"data.max_tokens_per_source={SETTINGS['max_tokens_per_source']}"])
    init_ray(cfg.run)
    teacher_dir = build_miniature_teacher(cfg, say)
    teacher_unseen = score_unseen(load_causal_lm(teacher_dir), load_tokenizer(teacher_dir), cfg.data.cache_dir)["mean"]
    unseen = lambda model, tok: score_unseen(model, tok, cfg.data.cache_dir)  # noqa: E731
    steps = math.ceil(tokens / (MINI_BATCH * SETTINGS["seq_len"] * MINI_FILL))
    common = _mini_common(teacher_dir, out)
    stage2 = _run(common + ["distillation=ce_only", f"training.max_steps={steps}", "run.name=mini-stage2"], unseen)
    say(f"miniature stage 2: held-out {stage2['heldout_bpb']:.3f} bits/byte after {stage2['summary']['tokens_seen']:,} tokens")
    results = []
    for seed in seeds:
        for arm, choice in MINI_ARMS.items():
            if arms and not any(a in arm for a in arms):
                continue
            got = _run(common + choice + [f"student.checkpoint_path={stage2['summary']['student_checkpoint']}",
                                          f"training.max_steps={steps}", f"training.seed={seed}",
                                          f"run.name=mini-{len(results)}"], unseen)
            row = {"scale": "miniature", "arm": arm, "seed": seed, "tokens": got["summary"]["tokens_seen"],
                   "heldout_bpb": got["heldout_bpb"], "unseen_bpb": got["unseen_bpb"],
                   "last": {k: got["summary"]["last"].get(k) for k in ("ce", "logits_kl", "attention")}}
            results.append(row)
            log(row)
    teacher = {"heldout_bpb": stage2["summary"]["heldout"]["teacher"]["bits_per_byte"], "unseen_bpb": teacher_unseen}
    start = {"heldout_bpb": stage2["summary"]["heldout"]["student_before"]["bits_per_byte"],
             "stage2_heldout_bpb": stage2["heldout_bpb"], "stage2_unseen_bpb": stage2["unseen_bpb"],
             "stage2_tokens": stage2["summary"]["tokens_seen"]}
    return {"results": results, "teacher": teacher, "start": start, "steps": steps,
            "teacher_settings": SETTINGS, "teacher_trained": json.loads((teacher_dir / "trained.json").read_text())}


def gpu(seeds, tokens: int, out: str, log) -> dict:
    """The larger-budget point: the real teacher and the full-depth (30-layer) student with
    `experiment=gpu` on one GPU (teacher and student half of it each), `tokens` real tokens per arm
    in rows of 2,048 (4M tokens: 67 s of student steps at the 59.6k tokens/s an H200 measured for the
    KD step alone, more with the teacher sharing the GPU)."""
    import torch

    from bench.bench_gpu import HALF_GPU

    if not torch.cuda.is_available():
        raise SystemExit("bench quality --scale gpu needs a CUDA GPU; none is visible")
    steps = math.ceil(tokens / (GPU_BATCH * GPU_SEQ))
    return smollm2(seeds, out, log, "gpu", ["experiment=gpu", "student.num_layers=null", f"data.seq_len={GPU_SEQ}",
                                            f"training.batch_size={GPU_BATCH}", f"training.max_steps={steps}",
                                            *HALF_GPU])


def smollm2(seeds, out: str, log, scale: str = "smollm2", extra: tuple = ()) -> dict:
    from bench.unseen import score_unseen
    from distillation.config import load_config
    from distillation.models import load_causal_lm, load_tokenizer, resolve_model

    cfg = load_config()
    teacher_dir = resolve_model(cfg.teacher.model, cfg.data.cache_dir)
    teacher_unseen = score_unseen(load_causal_lm(teacher_dir), load_tokenizer(teacher_dir), cfg.data.cache_dir)["mean"]
    unseen = lambda model, tok: score_unseen(model, tok, cfg.data.cache_dir)  # noqa: E731
    results, teacher_heldout = [], None
    for seed in seeds:
        for arm, choice in SMOL_ARMS.items():
            got = _run(choice + list(extra) + [f"training.seed={seed}", f"run.output_dir={out}",
                                               f"run.name={scale}-{len(results)}"], unseen)
            teacher_heldout = got["summary"]["heldout"]["teacher"]["bits_per_byte"]
            row = {"scale": scale, "arm": arm, "seed": seed, "tokens": got["summary"]["tokens_seen"],
                   "heldout_bpb": got["heldout_bpb"], "unseen_bpb": got["unseen_bpb"],
                   "last": {k: got["summary"]["last"].get(k) for k in ("ce", "logits_kl", "attention")}}
            results.append(row)
            log(row)
    return {"results": results, "teacher": {"heldout_bpb": teacher_heldout, "unseen_bpb": teacher_unseen}}


def _spread(values) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(scale: str, part: dict) -> str:
    teacher, rows = part["teacher"], part["results"]
    lines = [f"| {scale}: arm | tokens per arm | held-out bits/byte | gap closed (held-out) "
             f"| unseen English bits/byte | gap closed (unseen) |", "|---|---|---|---|---|---|",
             f"| teacher (full precision) | - | {teacher['heldout_bpb']:.3f} | - | {teacher['unseen_bpb']:.3f} | - |"]
    if "start" in part:
        s = part["start"]
        lines.append(f"| converted student, after stage 2 ({s['stage2_tokens']:,} tokens of CE) | - | "
                     f"{s['stage2_heldout_bpb']:.3f} | - | {s['stage2_unseen_bpb']:.3f} | - |")
    sft = {r["seed"]: r for r in rows if r["arm"].startswith("BitNet-SFT")}
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        cells = []
        for metric in ("heldout_bpb", "unseen_bpb"):
            values = [r[metric] for r in mine]
            closed = [(sft[r["seed"]][metric] - r[metric]) / (sft[r["seed"]][metric] - teacher[metric])
                      for r in mine if r["seed"] in sft]
            cells += [_spread(values), "-" if arm.startswith("BitNet-SFT") or not closed else _spread(closed)]
        tokens = statistics.median(r["tokens"] for r in mine)
        lines.append(f"| {arm} | {tokens:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", nargs="+", choices=["miniature", "smollm2", "gpu"], default=["miniature", "smollm2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tokens", type=int, default=500_000, help="miniature: real tokens per arm (and stage 2)")
    parser.add_argument("--gpu-tokens", type=int, default=4_000_000, help="gpu: real tokens per arm")
    parser.add_argument("--arms", nargs="+", help="miniature: only the arms whose names contain one of these")
    parser.add_argument("--log", default=str(Path(__file__).with_name("results") / "quality-runs.jsonl"))
    args = parser.parse_args(argv)

    def log(row):
        with open(args.log, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{row['scale']} {row['arm']} seed {row['seed']}: held-out {row['heldout_bpb']:.3f}, unseen "
              f"{row['unseen_bpb']:.3f} bits/byte ({row['tokens']:,} tokens)", flush=True)

    parts = {}
    with tempfile.TemporaryDirectory() as out:
        if "miniature" in args.scale:
            parts["miniature"] = miniature(args.seeds, args.tokens, out, log, args.arms)
        if "smollm2" in args.scale:
            parts["smollm2"] = smollm2(args.seeds, out, log)
        if "gpu" in args.scale:
            parts["gpu"] = gpu(args.seeds, args.gpu_tokens, out, log)
    text = "\n\n".join(table(scale, part) for scale, part in parts.items())
    print(text)
    return {"table": text, "seeds": args.seeds, "tokens": args.tokens, **parts}


if __name__ == "__main__":
    main()
