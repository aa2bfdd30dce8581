"""Entry point for `ray job submit --working-dir . -- python ray_jobs/distill.py <overrides>`.

Inside a Ray job RAY_ADDRESS is set, so the run joins the cluster instead of starting one.
"""

from distillation.cli import entry

if __name__ == "__main__":
    entry()
