"""Compose the config the way Hydra users expect (`group=option`, `a.b=value`), with one-line errors.

Hydra does the composition; this module only finds the config folder, validates the result against
the typed schema and turns Hydra's multi-line exceptions into one line that names the bad key and
the closest valid one.
"""

import dataclasses
import difflib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from distillation.config.schema import Config, SourceConfig, TaskConfig, choices, freeze
from distillation.errors import DistillError


def _field_rules(node: type = Config, prefix: str = "") -> Tuple[Dict[str, Tuple[str, ...]], List[str]]:
    """({key: allowed values}, [keys that must be positive]) from the schema's `one_of` / `positive` fields."""
    choices: Dict[str, Tuple[str, ...]] = {}
    positive: List[str] = []
    for f in dataclasses.fields(node):
        key = prefix + f.name
        if "choices" in f.metadata:
            choices[key] = f.metadata["choices"]
        if f.metadata.get("positive"):
            positive.append(key)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            sub_choices, sub_positive = _field_rules(type(default), key + ".")
            choices.update(sub_choices)
            positive += sub_positive
    return choices, positive


CHOICES, POSITIVE = _field_rules()

ConfigStore.instance().store(name="schema", node=Config)


def config_dir() -> Path:
    """The packaged copy in a wheel, else the repository's `configs/`."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_configs", here.parent.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise DistillError(f"no config folder found (looked for {here / '_configs'} and {here.parent.parent / 'configs'})")


def _closest(full_key: str, cfg: DictConfig) -> str:
    parent, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    valid = list(node.keys()) if isinstance(node, DictConfig) else []
    match = difflib.get_close_matches(leaf, [str(k) for k in valid], n=1)
    if match:
        return f"; did you mean '{parent + '.' if parent else ''}{match[0]}'?"
    return f"; valid keys under '{parent or '<root>'}': {', '.join(map(str, valid))}"


def _groups() -> List[str]:
    return sorted(p.name for p in config_dir().iterdir() if p.is_dir())


def _explain(exc: Exception, overrides: Iterable[str]) -> str:
    cause: BaseException = exc
    while not isinstance(cause, OmegaConfBaseException) and (parent := cause.__cause__ or cause.__context__):
        cause = parent
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        assert cause.full_key is not None  # checked just above
        base = OmegaConf.structured(Config)
        return f"unknown config key '{cause.full_key}'{_closest(cause.full_key, base)}"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        first = str(cause).splitlines()[0]
        return f"bad value for '{cause.full_key}': {first}"
    text = str(exc)
    if isinstance(exc, MissingConfigException) or "Could not find" in text:
        for item in overrides:
            group, _, option = item.partition("=")
            if group in _groups():
                options = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
                if option not in options:
                    return f"unknown option '{option}' for config group '{group}'; choose from {', '.join(options)}"
    return " ".join(text.split())


def _check(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise DistillError(f"bad value for '{key}': {value!r}; expected one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is None or value <= 0:
            raise DistillError(f"bad value for '{key}': {value!r}; expected a positive integer")
    ramped_in = ("recipe.pretrain_steps", cfg.recipe.pretrain_steps) if "pretrain" in (cfg.recipe.stages or []) else (
        "training.max_steps", cfg.training.max_steps)  # the recipe ramps once, in stage 2 (recipe.py)
    _check_quant_warmup(cfg.student, *ramped_in)
    if cfg.teacher.kind == "cached" and not cfg.teacher.cache_dir:
        raise DistillError("missing required config value 'teacher.cache_dir' (needed by teacher=cached)")
    if not cfg.data.sources:
        raise DistillError("data.sources is empty; expected at least one text source")
    names = [s.name for s in cfg.data.sources]
    if len(set(names)) != len(names):
        raise DistillError(f"data.sources names must be unique; got {names}")
    if cfg.influence.probe_source not in (None, *names):
        raise DistillError(f"influence.probe_source '{cfg.influence.probe_source}' is not a source; "
                           f"expected one of {', '.join(names)}")
    extra = [("task.test", cfg.task.test)] if cfg.task.test.kind else []
    extra += [(f"recipe.pretrain_sources[{i}]", s) for i, s in enumerate(cfg.recipe.pretrain_sources)]
    for where, source in [(f"data.sources[{i}]", s) for i, s in enumerate(cfg.data.sources)] + extra:
        if source.format not in choices(SourceConfig, "format"):
            raise DistillError(f"bad value for '{where}.format': {source.format!r}; expected one of "
                               f"{', '.join(choices(SourceConfig, 'format'))}")
    _check_task(cfg.task)
    if cfg.recipe.stages:
        from distillation.recipe import check_stages

        check_stages(list(cfg.recipe.stages))


def _check_quant_warmup(student: DictConfig, key: str, max_steps: int) -> None:
    """The warm-up must end inside the run: the saved and exported student is always fully ternary."""
    steps = student.quant_warmup_steps
    if steps < 0 or (steps and not student.ternary):
        raise DistillError(f"bad value for 'student.quant_warmup_steps': {steps}; expected 0 or more, and 0 "
                           f"with student.ternary=false (nothing is quantised)")
    if steps and steps >= max_steps:
        raise DistillError(f"student.quant_warmup_steps={steps} must be below {key}={max_steps}: the student is "
                           f"fully ternary only after the warm-up, and that is the student a run saves")


def _check_task(task: DictConfig) -> None:
    from distillation.tasks import METRICS

    if task.name is None:
        return
    if not task.test.kind or task.test.format == "text":
        raise DistillError(f"task '{task.name}' needs task.test: a source of prompt_response or messages records")
    unknown = [m for m in task.metrics if m not in METRICS]
    if unknown or not task.metrics:
        raise DistillError(f"task.metrics {list(task.metrics)}: expected some of {', '.join(METRICS)}")
    if "label_accuracy" in task.metrics and len(task.labels) < 2:
        raise DistillError("task.metrics has label_accuracy, which needs task.labels: two or more label words")


def load_config(overrides: Optional[List[str]] = None) -> Config:
    """Compose `configs/config.yaml` with Hydra-style overrides, validate it against the schema and
    return it as the schema's frozen dataclasses (what every function past here is typed against)."""
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise DistillError(f"bad override '{item}'; expected key=value or group=option")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (ConfigCompositionException, MissingConfigException, OmegaConfBaseException, ValueError) as exc:
        raise DistillError(_explain(exc, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    try:
        OmegaConf.resolve(cfg)
        typed = OmegaConf.to_object(cfg)  # raises on a missing required value
    except MissingMandatoryValue as exc:
        raise DistillError(f"missing required config value '{exc.full_key}'") from None
    except OmegaConfBaseException as exc:
        raise DistillError(_explain(exc, overrides)) from None
    _check(cfg)
    assert isinstance(typed, Config)
    return freeze(typed)


def load_task(name_or_path: str) -> Tuple[TaskConfig, str]:
    """(the task, data.chat_template) of a task YAML: a `configs/task/` option or a file of the same
    shape (its `task` section and optional `data.chat_template`; interpolations resolve within it)."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        cfg = load_config([f"task={name_or_path}"])
        return cfg.task, cfg.data.chat_template
    try:
        loaded = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(Config), {k: v for k, v in loaded.items() if k != "defaults"})
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise DistillError(f"task file '{path}': {_explain(exc, [])}") from None
    _check_task(merged.task)
    if merged.task.name is None:
        raise DistillError(f"task file '{path}' sets no task.name")
    typed = OmegaConf.to_object(merged)
    assert isinstance(typed, Config)
    return freeze(typed.task), typed.data.chat_template


def to_yaml(cfg: Config) -> str:
    """The run folder's config.yaml (the same text the DictConfig gave: key order is the schema's)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)
