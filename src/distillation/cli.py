"""`distill [group=option ...] [key=value ...]`: compose the config and run; bad input exits 2.

`distill eval STUDENT [--teacher MODEL] --text FILE [FILE ...]`: score a saved student (and its
teacher) on text files, in this process, without Ray."""

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
            "       distill eval STUDENT [--teacher MODEL] --text FILE [FILE ...] [--seq-len N]\n\n"
            f"Groups: {listed}.\nAny value: e.g. training.max_steps=200. --cfg prints the resolved configuration "
            "and exits. `distill eval --help` describes eval. Ctrl-C stops after the current step with a "
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
    if command == "distill" and args[:1] == ["eval"]:
        return eval_main(args[1:], f"{command} eval")
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


EVAL_USAGE = "%(prog)s STUDENT [--teacher MODEL] --text FILE [FILE ...] [--seq-len N]"
EVAL_DESCRIPTION = (
    "Next-token loss (nats/token) and bits per byte of a saved student, and optionally of a teacher, on UTF-8 "
    "text files: one line per file and model. Each file is one document, cut into rows as the training data "
    "is and scored by the same function as the run summary's held-out loss. Runs in this process, no Ray.")


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
    parser.add_argument("--text", metavar="FILE", nargs="+", required=True, help="UTF-8 text files")
    parser.add_argument("--seq-len", metavar="N", type=int, default=DataConfig().seq_len,
                        help="tokens per row (default %(default)s, as training's data.seq_len)")
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
                   emit=print) -> List[dict]:
    """Score `student` (then `teacher`) on every file; `emit` gets each output line as it is ready.
    Every input is checked (files read, folders resolved, tokenizers loaded) before any model is."""
    from distillation.config.schema import DataConfig, StudentConfig
    from distillation.errors import DistillError
    from distillation.models import load_causal_lm, load_tokenizer, resolve_model
    from distillation.student import load_student, set_compile
    from distillation.training.evaluate import score_text

    if seq_len < 2:
        raise DistillError(f"--seq-len must be at least 2, not {seq_len}")
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

    set_compile(StudentConfig().compile)
    width = max(len(name) for name, _ in docs)
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
                           emit=lambda line: print(line, flush=True))
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    except (_UsageError, DistillError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    entry()
