"""Config composition: groups, overrides, and one-line errors naming what was wrong."""

import pytest

from distillation.config import load_config, to_yaml
from distillation.errors import DistillError


def test_default_composes_with_the_measured_defaults_and_the_paper_presets_keep_the_papers():
    cfg = load_config()
    assert cfg.teacher.kind == "hf" and cfg.student.init_from == cfg.teacher.model
    assert cfg.teacher.signal == "hidden" and cfg.student.num_layers == 8  # experiment=cpu_default
    d = cfg.distillation
    assert (d.logits_weight, d.attention_weight, d.temperature, d.temperature_squared) == (10.0, 1e4, 1.0, True)
    assert d.attention_normalization == "reference"
    paper = load_config(["distillation=classification"]).distillation
    assert (paper.logits_weight, paper.attention_weight, paper.temperature) == (10.0, 1e5, 5.0)
    assert [s.name for s in cfg.data.sources] == ["shakespeare", "python_code", "python_docs"]


def test_groups_and_values_override_like_hydra():
    cfg = load_config(["distillation=summarization", "training.max_steps=200", "teacher.top_k=64"])
    assert (cfg.distillation.logits_weight, cfg.distillation.attention_weight) == (1.0, 1e3)
    assert cfg.training.max_steps == 200 and cfg.teacher.top_k == 64
    assert load_config(["distillation=logits_only"]).distillation.attention_weight == 0
    assert "max_steps: 200" in to_yaml(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["training.max_step=5"], "unknown config key 'training.max_step'; did you mean 'training.max_steps'"),
    (["distillation=bitdistil"], "unknown option 'bitdistil' for config group 'distillation'"),
    (["training.max_steps=many"], "bad value for 'training.max_steps'"),
    (["training.max_steps=0"], "expected a positive integer"),
    (["teacher.kind=onnx"], "expected one of hf, vllm, cached"),
    (["teacher=cached"], "missing required config value 'teacher.cache_dir'"),
    (["max_steps"], "expected key=value"),
    (["data.sources=[{name: a, kind: jsonl, path: /x, format: chat}]"],
     "bad value for 'data.sources[0].format': 'chat'; expected one of text, messages, prompt_response"),
    (["task.name=t", "task.metrics=[accuracy]"], "task 't' needs task.test: a source of prompt_response or messages"),
    (["task=shakespeare_genre", "task.metrics=[bleu]"], "task.metrics ['bleu']: expected some of accuracy, rouge_l"),
    (["task=shakespeare_genre", "task.labels=[comedy]"], "label_accuracy, which needs task.labels: two or more"),
    (["student.quant_warmup_steps=30", "training.max_steps=30"],
     "student.quant_warmup_steps=30 must be below training.max_steps=30: the student is fully ternary only after"),
    (["recipe=bitdistill", "student.quant_warmup_steps=80", "recipe.pretrain_steps=50"],
     "student.quant_warmup_steps=80 must be below recipe.pretrain_steps=50"),
    (["student.quant_warmup_steps=-1"], "bad value for 'student.quant_warmup_steps': -1; expected 0 or more"),
    (["student.quant_warmup_steps=5", "student.ternary=false"], "and 0 with student.ternary=false"),
    (["student.quant_warmup_schedule=cosine"], "expected one of linear, sigmoid"),
    (["recipe.stages=[distill,teacher_sft]"], "recipe.stages=['distill', 'teacher_sft']: expected some of teacher_sft, "
                                              "pretrain, distill, in that order"),
])
def test_bad_config_gives_one_line_error_naming_the_problem(overrides, message):
    with pytest.raises(DistillError) as info:
        load_config(overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_config_is_read_only_after_validation():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.training.max_steps = 3
