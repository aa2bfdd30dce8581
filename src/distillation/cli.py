"""`distill [group=option ...] [key=value ...]`: compose the config and run; bad input exits 2."""

import sys
from typing import List, Optional

USAGE = """usage: distill [--cfg] [group=option ...] [key=value ...]

Groups: teacher={hf,vllm,cached} student=bitnet distillation={bitdistill,logits_only,classification,
summarization,ce_only} data=mixed_text training={cpu_default,gpu}. Any value: e.g. training.max_steps=200.
--cfg prints the resolved configuration and exits."""


def main(argv: Optional[List[str]] = None, command: str = "distill") -> int:
    """`command` is `distill` (train) or `precompute` (fill the teacher cache for the same data plan)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    from distillation.config import load_config, to_yaml
    from distillation.errors import DistillError

    show = "--cfg" in args
    try:
        cfg = load_config([a for a in args if a != "--cfg"])
        if show:
            print(to_yaml(cfg))
            return 0
        if command == "precompute":
            from distillation.precompute import precompute

            precompute(cfg)
        else:
            from distillation.run import run

            run(cfg)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
