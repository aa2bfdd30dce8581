"""`distill-export STUDENT_DIR OUT_DIR`: write the packed 2-bit inference checkpoint of a student."""

import shutil
import sys
from pathlib import Path
from typing import List, Optional

from distillation.errors import DistillError
from distillation.models import TOKENIZER_FILES


def export_packed(student_dir: Path, out_dir: Path) -> dict:
    from distillation.student import set_compile
    from distillation.student.checkpoint import load_student, save_student
    from distillation.student.packed import linear_weight_bytes, pack_student

    set_compile(False)  # transformers wraps the packed kernels in torch.compile; eager is exact and fast to start
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    model = load_student(student_dir)
    if model.config.bitnet.get("weights") == "packed":
        raise DistillError(f"'{student_dir}' is already packed")
    packed = pack_student(model)
    save_student(packed, out_dir)
    for name in TOKENIZER_FILES:
        if (student_dir / name).is_file():
            shutil.copy2(student_dir / name, out_dir / name)
    return linear_weight_bytes(packed)


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or any(a in ("-h", "--help") for a in args):
        print(__doc__.split(":", 1)[0].strip("`"), file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        sizes = export_packed(Path(args[0]), Path(args[1]))
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"packed student written to {args[1]}: linear weights {sizes['stored'] / 2**20:.1f} MiB "
          f"(fp16 {sizes['fp16'] / 2**20:.1f} MiB, {sizes['fp16'] / sizes['stored']:.2f}x smaller)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
