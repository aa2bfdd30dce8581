"""`distill [group=option ...] [key=value ...]`: compose the config and run; bad input exits 2.

The student's commands run in this process, without Ray:
`distill eval STUDENT [--teacher MODEL] --text FILE [FILE ...]`: score a saved student (and its teacher)
on text files; `distill export STUDENT OUT [--format hf|packed|gguf]`: write it for transformers or
llama.cpp (student/export.py); `distill generate STUDENT PROMPT`: its answer (student/generate.py)."""

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional


def usage() -> str:
    """The usage text, with every config group and its options read from the config folders."""
    from distillation.config.loader import config_dir

    groups = sorted(p for p in config_dir().iterdir() if p.is_dir())
    listed = " ".join(f"{g.name}={{{','.join(sorted(o.stem for o in g.glob('*.yaml')))}}}" for g in groups)
    return ("usage: distill [--cfg] [group=option ...] [key=value ...]\n"
            "       distill eval STUDENT [--teacher MODEL] [--text FILE ...] [--seq-len N] [--task TASK]\n"
            "       distill export STUDENT OUT [--format hf|packed|gguf] [--gguf-type tq2_0|tq1_0|f16]\n"
            "       distill generate STUDENT PROMPT [--max-new-tokens N] [--sample] [--raw]\n\n"
            f"Groups: {listed}.\nAny value: e.g. training.max_steps=200. --cfg prints the resolved configuration "
            "and exits. `distill eval|export|generate --help` describe those. Ctrl-C stops after the current step with a "
            "checkpoint (exit 130); a second Ctrl-C stops at once.")


_LEAVE_AT_ONCE = False  # set when a run stopped at once (a second Ctrl-C): see `entry`


def entry() -> None:
    """The `distill` command. After a run stopped at once, Ray Train's fit() still waits in ray.get
    on its thread, and Ray's shutdown at interpreter exit makes such a thread end the process with
    status 1; the run's clean-up is done and a local cluster's processes share this one's fate, so
    the process leaves at once with the status meant."""
    code = main()
    if _LEAVE_AT_ONCE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: Optional[List[str]] = None, command: str = "distill") -> int:
    """`command` is `distill` (train) or `precompute` (fill the teacher cache for the same data plan)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if command == "distill" and args[:1] and args[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args[0]](args[1:], f"{command} {args[0]}")
    if any(a in ("-h", "--help") for a in args):
        print(usage())
        return 0
    from distillation.config import load_config, to_yaml
    from distillation.errors import DistillError

    show = "--cfg" in args
    try:
        cfg = load_config([a for a in args if a != "--cfg"])
        if show:
            print(to_yaml(cfg))
            return 0
        from distillation.console import RayLinesToFile

        with RayLinesToFile(enabled=not cfg.run.verbose) as ray_lines:
            if command == "precompute":
                from distillation.precompute import precompute

                precompute(cfg)
            elif cfg.recipe.stages:
                from distillation.recipe import run_recipe
                from distillation.run import run

                run_recipe(cfg, lambda stage: run(stage, ray_lines))
            else:
                from distillation.run import run

                run(cfg, ray_lines)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        global _LEAVE_AT_ONCE
        _LEAVE_AT_ONCE = getattr(exc, "at_once", False)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:  # outside training (where the driver handles it): set-up or clean-up
        print("error: interrupted; if the run folder exists, run.resume=true continues from its last checkpoint",
              file=sys.stderr)
        return 130
    return 0


EVAL_USAGE = "%(prog)s STUDENT [--teacher MODEL] [--text FILE [FILE ...]] [--seq-len N] [--task TASK [--records N]]"
EVAL_DESCRIPTION = (
    "Next-token loss (nats/token) and bits per byte of a saved student, and optionally of a teacher, on UTF-8 "
    "text files: one line per file and model. Each file is one document, cut into rows as the training data "
    "is and scored by the same function as the run summary's held-out loss. With --task, also the task's metrics on "
    "its held-out records (TASK: a configs/task option such as shakespeare_genre, or a task YAML file). Runs in "
    "this process, no Ray.")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit 2, like every other bad input
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def eval_parser(prog: str = "distill eval") -> argparse.ArgumentParser:
    from distillation.config.schema import DataConfig

    parser = _Parser(prog=prog, usage=EVAL_USAGE, description=EVAL_DESCRIPTION)
    parser.add_argument("student", metavar="STUDENT", help="a saved student folder (e.g. RUN_DIR/student)")
    parser.add_argument("--teacher", metavar="MODEL",
                        help="also score this model: a built-in name (smollm2-135m-instruct), a local folder or a hub name")
    parser.add_argument("--text", metavar="FILE", nargs="+", default=[], help="UTF-8 text files")
    parser.add_argument("--seq-len", metavar="N", type=int, default=DataConfig().seq_len,
                        help="tokens per row (default %(default)s, as training's data.seq_len)")
    parser.add_argument("--task", metavar="TASK", help="a task: a configs/task option or a task YAML file")
    parser.add_argument("--records", metavar="N", type=int, help="held-out records to score (default: task.records)")
    return parser


def _read_text(name: str) -> str:
    from distillation.errors import DistillError

    try:
        raw = Path(name).expanduser().read_bytes()
    except FileNotFoundError:
        raise DistillError(f"text file '{name}' does not exist") from None
    except IsADirectoryError:
        raise DistillError(f"text file '{name}' is a directory") from None
    except OSError as exc:
        raise DistillError(f"text file '{name}' is unreadable: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DistillError(f"text file '{name}' is not UTF-8 (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise DistillError(f"text file '{name}' is empty")
    return text


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def evaluate_files(student: str, texts: List[str], teacher: Optional[str], seq_len: int,
                   emit=print, task: Optional[str] = None, records: Optional[int] = None) -> List[dict]:
    """Score `student` (then `teacher`) on every file and on `task`; `emit` gets each output line as
    it is ready. Every input is checked (files read, folders resolved, tokenizers loaded, the task's
    records read) before any model is."""
    from distillation.config.schema import DataConfig, StudentConfig
    from distillation.errors import DistillError
    from distillation.models import load_causal_lm, load_tokenizer, resolve_model
    from distillation.student import load_student, set_compile
    from distillation.training.evaluate import score_text

    if seq_len < 2:
        raise DistillError(f"--seq-len must be at least 2, not {seq_len}")
    if not texts and not task:
        raise DistillError("nothing to score: give --text FILE ... and/or --task TASK")
    if records is not None and records < 1:
        raise DistillError(f"--records must be at least 1, not {records}")
    docs = [(name, _read_text(name)) for name in texts]
    student_dir = Path(student).expanduser()
    if not (student_dir / "config.json").is_file():
        raise DistillError(f"student checkpoint '{student}' does not exist or has no config.json")
    teacher_dir = resolve_model(teacher, DataConfig().cache_dir) if teacher else None
    if _has_tokenizer(student_dir):
        tokenizer_dir = student_dir
    elif teacher_dir is not None and _has_tokenizer(teacher_dir):
        tokenizer_dir = teacher_dir
    else:
        raise DistillError(f"student checkpoint '{student}' holds no tokenizer (tokenizer.json); "
                           "pass --teacher MODEL to use the teacher's")
    try:
        student_tokenizer = load_tokenizer(tokenizer_dir)
        teacher_tokenizer = (load_tokenizer(teacher_dir) if teacher_dir is not None and _has_tokenizer(teacher_dir)
                             else student_tokenizer)
    except (OSError, ValueError) as exc:
        raise DistillError(f"cannot load the tokenizer in '{tokenizer_dir}': {_one_line(exc)}") from None
    probe = _task_probe(task, records, str(tokenizer_dir)) if task else None

    set_compile(StudentConfig().compile)
    width = max([len(name) for name, _ in docs] + [len(f"task {probe.name}") if probe else 0])
    results = []

    def score(label: str, model, tokenizer) -> None:
        for name, text in docs:
            try:
                r = score_text(model, tokenizer, text, seq_len)
            except DistillError as exc:
                raise DistillError(f"{label} on '{name}': {exc}") from None
            results.append({"model": label, "file": name, **r})
            emit(f"{label:<7}  {name:<{width}}  nats/token {r['loss']:.3f}  bits/byte {r['bits_per_byte']:.3f}  "
                 f"tokens {r['tokens']:,}")
        if probe is not None:
            scores = probe.score(model)
            results.append({"model": label, "task": probe.name, **scores})
            emit(f"{label:<7}  {'task ' + probe.name:<{width}}  " + "  ".join(
                f"{k} {v:.3f}" for k, v in scores.items() if k != "examples") + f"  records {int(scores['examples'])}")

    try:
        model = load_student(student_dir)
    except (OSError, ValueError) as exc:
        raise DistillError(f"cannot read student checkpoint '{student}': {_one_line(exc)}") from None
    score("student", model, student_tokenizer)
    del model  # one model in memory at a time
    if teacher_dir is not None:
        try:
            model = load_causal_lm(teacher_dir, "float32", trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise DistillError(f"cannot load teacher '{teacher}': {_one_line(exc)}") from None
        score("teacher", model, teacher_tokenizer)
    return results


def _task_probe(task: str, records: Optional[int], tokenizer: str):
    from dataclasses import replace

    from distillation.config.loader import load_task
    from distillation.config.schema import DataConfig
    from distillation.tasks.probe import task_probe

    config, chat_template = load_task(task)
    if records is not None:
        config = replace(config, records=records)
    probe = task_probe(config, DataConfig(chat_template=chat_template), tokenizer)
    assert probe is not None  # load_task refuses a task without a name
    return probe


def eval_main(args: List[str], prog: str = "distill eval") -> int:
    from distillation.errors import DistillError

    try:
        try:
            opts = eval_parser(prog).parse_args(args)
        except SystemExit as exc:  # --help, printed
            return int(exc.code or 0)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # stdout and stderr hold the result lines and errors only
        try:
            evaluate_files(opts.student, opts.text, opts.teacher, opts.seq_len,
                           emit=lambda line: print(line, flush=True), task=opts.task, records=opts.records)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    except (_UsageError, DistillError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def export_parser(prog: str) -> argparse.ArgumentParser:
    from distillation.student.export import FORMATS
    from distillation.student.export import __doc__ as doc
    from distillation.student.gguf_export import TERNARY_TYPES

    parser = _Parser(prog=prog, description=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", metavar="STUDENT", help="a student folder the project wrote (e.g. RUN_DIR/student)")
    parser.add_argument("out", metavar="OUT", help="the new folder (hf, packed) or .gguf file (gguf)")
    parser.add_argument("--format", choices=FORMATS, default="hf", help="default %(default)s")
    parser.add_argument("--gguf-type", choices=TERNARY_TYPES, default="tq2_0",
                        help="GGUF type of the ternary weights whose rows are a multiple of 256 (others Q8_0; f16: "
                             "every weight F16); default %(default)s")
    return parser


def export_main(args: List[str], prog: str = "distill export") -> int:
    def run(opts) -> None:
        from distillation.student.export import describe, export_student

        print(describe(export_student(Path(opts.student), Path(opts.out), opts.format, opts.gguf_type)))

    return _subcommand(export_parser(prog), args, run)


def generate_parser(prog: str) -> argparse.ArgumentParser:
    from distillation.student.generate import GenerateOptions
    from distillation.student.generate import __doc__ as doc

    d = GenerateOptions()
    parser = _Parser(prog=prog, description=doc.split("\n\n", 1)[1])
    parser.add_argument("student", metavar="STUDENT", help="a student folder the project wrote, or a .gguf file")
    parser.add_argument("prompt", metavar="PROMPT")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="default %(default)s")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="with --sample; default %(default)s")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="with --sample; default %(default)s")
    parser.add_argument("--seed", type=int, default=d.seed, help="with --sample; default %(default)s")
    parser.add_argument("--raw", action="store_true", help="the prompt as it is, without the chat template")
    return parser


def generate_main(args: List[str], prog: str = "distill generate") -> int:
    def run(opts) -> None:
        from distillation.student.generate import GenerateOptions, generate

        options = GenerateOptions(opts.max_new_tokens, opts.sample, opts.temperature, opts.top_p, opts.seed, opts.raw)
        print(generate(opts.student, opts.prompt, options), flush=True)

    return _subcommand(generate_parser(prog), args, run)


def _subcommand(parser: argparse.ArgumentParser, args: List[str], run) -> int:
    """Parse, run quietly (stdout holds the result, stderr one `error:` line), exit 2 on bad input."""
    from distillation.errors import DistillError

    try:
        try:
            opts = parser.parse_args(args)
        except SystemExit as exc:  # --help, printed
            return int(exc.code or 0)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        run(opts)
    except (_UsageError, DistillError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


SUBCOMMANDS = {"eval": eval_main, "export": export_main, "generate": generate_main}


if __name__ == "__main__":
    entry()
