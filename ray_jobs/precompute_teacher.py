"""Fill the teacher cache for the data plan a `distill` run with the same overrides would train on.

    python ray_jobs/precompute_teacher.py teacher=cached teacher.cache_dir=/data/teacher-cache
    distill teacher=cached teacher.cache_dir=/data/teacher-cache        # replays it, no teacher model

Also works under `ray job submit --working-dir . -- python ray_jobs/precompute_teacher.py ...`.
"""

import sys

from distillation.cli import main

if __name__ == "__main__":
    sys.exit(main(command="precompute"))
