"""`distill export STUDENT OUT [--format hf|packed|gguf]`: a student in the form it is used in.

    hf      a folder plain transformers loads as the same model (latent fp32 weights, ternarised on
            each forward: what training computes, exactly); the run's own student/ is already this
    packed  a folder with 2 bits per ternary weight (transformers' offline BitNet layout); plain
            transformers loads it as dense ternary matrices, `load_student` keeps it packed and runs
            the CPU kernel
    gguf    one file for llama.cpp's bitnet architecture (student/gguf_export.py)

Every input is checked before anything is written; the output appears whole or not at all.
"""

from pathlib import Path
from typing import Optional

from distillation.errors import DistillError
from distillation.storage import check_writable
from distillation.student.checkpoint import read_student_config, write_student
from distillation.student.gguf_export import TERNARY_TYPES, gguf_problem, read_tokenizer_json
from distillation.student.layout import base_config, layout_for

FORMATS = ("hf", "packed", "gguf")


def export_problem(config, subln: str, fmt: str) -> Optional[str]:
    """Why a student of this base config and SubLN placement cannot be exported as `fmt` (None: it can)."""
    if fmt == "gguf":
        return gguf_problem(config, subln)
    refusal = layout_for(config, subln).refusal
    if fmt == "hf" and refusal:
        return f"{refusal}; student.subln=allnorm exports"
    return None


def _check_output(out: Path, fmt: str) -> None:
    if out.exists():
        raise DistillError(f"export output '{out}' already exists; choose a new path")
    if fmt == "gguf" and out.suffix != ".gguf":
        raise DistillError(f"a GGUF export is one file: expected OUT ending in .gguf, not '{out}'")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DistillError(f"export output folder '{parent}' does not exist")
    check_writable(parent, f"export output {out}")


def export_student(student_dir: Path, out: Path, fmt: str = "hf", gguf_type: str = "tq2_0") -> dict:
    """Write `student_dir` (any student folder the project wrote) to `out` as `fmt`; returns a report."""
    from distillation.student.build import set_compile
    from distillation.student.checkpoint import load_student
    from distillation.student.packed import packed_state

    if fmt not in FORMATS:
        raise DistillError(f"export format must be one of {', '.join(FORMATS)}, not '{fmt}'")
    if gguf_type not in TERNARY_TYPES:
        raise DistillError(f"GGUF type must be one of {', '.join(TERNARY_TYPES)}, not '{gguf_type}'")
    student_dir, out = Path(student_dir).expanduser(), Path(out).expanduser()
    saved = read_student_config(student_dir)
    settings = saved["bitnet"]
    if settings.get("weights") == "packed":
        raise DistillError(f"'{student_dir}' is already packed; export from the student it was packed from")
    problem = export_problem(base_config(saved), settings["subln"], fmt)
    if problem:
        raise DistillError(f"cannot export '{student_dir}' as {fmt}: {problem}")
    _check_output(out, fmt)
    if fmt == "gguf":
        read_tokenizer_json(student_dir)
    set_compile(False)
    model = load_student(student_dir).eval()
    if fmt == "gguf":
        from distillation.student.gguf_export import write_gguf

        tensors = write_gguf(model, student_dir, out, gguf_type, name=student_dir.name)
    else:
        state = packed_state(model) if fmt == "packed" else model.state_dict()
        write_student(out, model.config, settings["subln"], "online" if fmt == "hf" else "packed", state,
                      generation_config=getattr(model, "generation_config", None), copy_from=student_dir)
        tensors = None
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"format": fmt, "path": str(out), "weight_bytes": size, "gguf_tensor_types": tensors}


RUN_EXPORTS = {"packed": "student-packed", "gguf": "student.gguf"}  # beside the run's student/


def export_run_student(student_dir: Path, run_dir: Path, formats) -> dict:
    """`student.export` at the end of a run: {format: path}. The run's student/ is already the hf
    format; an earlier export of a resumed run is replaced."""
    import shutil

    written = {}
    for fmt in formats:
        if fmt == "hf":
            written[fmt] = str(student_dir)
            continue
        target = Path(run_dir) / RUN_EXPORTS[fmt]
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        written[fmt] = export_student(student_dir, target, fmt)["path"]
    return written


def describe(report: dict) -> str:
    line = f"{report['format']} export written to {report['path']}: {report['weight_bytes'] / 2**20:.1f} MiB of weights"
    if report["gguf_tensor_types"]:
        line += " (tensors by type: " + ", ".join(f"{k} {v}" for k, v in sorted(report["gguf_tensor_types"].items())) + ")"
    return line


def main(argv=None) -> int:
    """The old `distill-export STUDENT OUT` (a packed export): kept, pointing at `distill export`."""
    import sys

    from distillation.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    print("note: distill-export is now `distill export STUDENT OUT --format packed`", file=sys.stderr)
    return cli_main(["export", *args, "--format", "packed"])
