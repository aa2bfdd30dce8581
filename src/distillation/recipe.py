"""The driver's recipe phase: BitDistill's stages as runs of their own, in order, each one's output
the next one's input (`recipe.stages`; configs/recipe/bitdistill.yaml).

    <run.output_dir>/<run.name>/
        teacher_sft/   stage 0: the teacher fine-tuned in full precision on data.sources (CE only)
        pretrain/      stage 2: the converted student, continued pre-training with CE on recipe.pretrain_sources
        distill/       stage 3: the fine-tuned teacher distilled into stage 2's student on data.sources
        recipe.json    the stages, their students and their summaries' held-out numbers

A stage whose `student/` exists is skipped (its summary read back); a stage folder without it is
resumed from its last checkpoint; each stage is an ordinary run, so it also runs alone (the README
shows the three commands). With `run.storage_path` each stage keeps its checkpoints and student in
`<storage_path>/<run.name>/<stage>/`, and the next stage loads them from there: a shared folder, so
teacher replicas and training workers on any node read the previous stage's student.
"""

import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional

from distillation.config import Config
from distillation.console import say
from distillation.errors import DistillError
from distillation.storage import join, normalised, write_text

STAGES = ("teacher_sft", "pretrain", "distill")


def check_stages(stages: List[str]) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown or list(stages) != [s for s in STAGES if s in stages]:
        raise DistillError(f"recipe.stages={list(stages)}: expected some of {', '.join(STAGES)}, in that order")


def durable_root(cfg: Config, root: Path) -> Path:
    """Where the stages' students and summaries last: `<run.storage_path>/<recipe name>` when set (a
    folder every node reads: the next stage's replicas and workers load the student from it), else
    the local recipe folder."""
    if not cfg.run.storage_path:
        return root
    location = join(normalised(cfg.run.storage_path), root.name)
    if "://" in location and not location.startswith("file://"):
        raise DistillError(f"recipe.stages with run.storage_path={cfg.run.storage_path}: each stage loads the "
                           f"previous stage's student from a folder, so the storage must be a shared file system "
                           f"path (or file://); run the stages alone with an object store")
    return Path(location.removeprefix("file://"))


def stage_configs(cfg: Config, root: Path, outputs: Dict[str, str]) -> Dict[str, Config]:
    """Each stage's run configuration; `outputs` are the students of the stages done so far (a later
    stage's inputs). Every stage keeps the recipe's cluster, logging and task settings."""
    r, stages, durable = cfg.recipe, cfg.recipe.stages, durable_root(cfg, root)

    def stage(name: str, **sections) -> Config:
        begun = any((base / name / "config.yaml").is_file() for base in (root, durable))  # stopped: resume it
        run = replace(cfg.run, output_dir=str(root), name=name, resume=begun,
                      storage_path=str(durable) if cfg.run.storage_path else None)
        return replace(cfg, recipe=replace(r, stages=[]), run=run, **sections)

    ce_only = replace(cfg.distillation, logits_weight=0.0, attention_weight=0.0)  # as configs/distillation/ce_only.yaml
    out = {}
    if "teacher_sft" in stages:
        out["teacher_sft"] = stage(
            "teacher_sft", distillation=ce_only,
            student=replace(cfg.student, ternary=False, init_from=cfg.teacher.model, checkpoint_path=None,
                            num_layers=None, export=[], quant_warmup_steps=0),
            training=replace(cfg.training, max_steps=r.teacher_sft_steps, lr=r.teacher_sft_lr),
            teacher=replace(cfg.teacher, score_heldout=False))
    teacher = replace(cfg.teacher, model=outputs.get("teacher_sft", cfg.teacher.model))
    if "pretrain" in stages:
        out["pretrain"] = stage(
            "pretrain", distillation=ce_only, teacher=replace(teacher, score_heldout=False),
            data=replace(cfg.data, sources=list(r.pretrain_sources or cfg.data.sources)),
            task=replace(cfg.task, name=None), student=replace(cfg.student, export=[]),
            training=replace(cfg.training, max_steps=r.pretrain_steps))
    if "distill" in stages:
        # the quantisation warm-up runs once, in the first stage that trains the converted student
        student = (replace(cfg.student, checkpoint_path=outputs["pretrain"], quant_warmup_steps=0)
                   if "pretrain" in outputs else cfg.student)
        out["distill"] = stage("distill", teacher=teacher, student=student)
    return out


def _done(folder: Path) -> Optional[dict]:
    """A finished stage's summary (its student/ written), else None."""
    summary = folder / "summary.json"
    return json.loads(summary.read_text()) if (folder / "student").is_dir() and summary.is_file() else None


def run_recipe(cfg: Config, run_stage: Callable[[Config], dict]) -> dict:
    """Every stage of `cfg.recipe.stages`, in order, through `run_stage` (run.run); returns recipe.json's content."""
    check_stages(cfg.recipe.stages)
    name = cfg.run.name or datetime.now().strftime("recipe-%Y%m%d-%H%M%S")
    root = Path(cfg.run.output_dir).expanduser().resolve() / name
    durable = durable_root(cfg, root)
    outputs: Dict[str, str] = {}
    report: Dict[str, dict] = {}
    for stage in cfg.recipe.stages:
        stage_cfg = stage_configs(cfg, root, outputs)[stage]
        summary = _done(durable / stage)
        if summary is None:
            say(f"recipe {name}: stage {stage} ({STAGES.index(stage) + 1} of the recipe's {len(STAGES)} kinds)"
                + (", resumed" if stage_cfg.run.resume else ""))
            summary = run_stage(stage_cfg)
        else:
            say(f"recipe {name}: stage {stage} is done ({durable / stage / 'student'}): skipped")
        outputs[stage] = str(durable / stage / "student")
        report[stage] = {"student": outputs[stage], "steps": summary.get("steps"),
                         "heldout": {k: v and {m: v.get(m) for m in ("loss", "bits_per_byte", "task")}
                                     for k, v in summary.get("heldout", {}).items()}}
        text = json.dumps({"stages": report}, indent=2)
        root.mkdir(parents=True, exist_ok=True)
        (root / "recipe.json").write_text(text)
        if durable != root:
            write_text(str(durable / "recipe.json"), text)
    return {"stages": report, "recipe_dir": str(root)}
