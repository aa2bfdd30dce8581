"""Checks before a run starts: the run folder."""

import pytest

from distillation.config import load_config
from distillation.errors import DistillError


def test_an_output_folder_that_cannot_be_created_is_a_clear_error():
    from distillation.preflight import run_folder

    with pytest.raises(DistillError, match="cannot create run folder /proc/distill-out/x"):
        run_folder(load_config(["run.output_dir=/proc/distill-out", "run.name=x"]))
    with pytest.raises(DistillError, match="holds no run"):
        run_folder(load_config(["run.output_dir=/proc/distill-out", "run.name=x", "run.resume=true"]))
