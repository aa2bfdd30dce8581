"""What the terminal shows: our lines and progress bar; Ray's lines (on stderr or stdout) go to the run's
driver.log."""

import os
import time

import pytest

from distillation.console import RayLinesToFile
from distillation.errors import DistillError


def _wait_for_pump():
    time.sleep(0.3)  # the pump thread sorts what reached fd 2


def test_a_ray_line_glued_to_the_progress_bar_goes_to_the_log_and_the_bar_stays(capfd, tmp_path):
    with RayLinesToFile(enabled=True) as lines:
        lines.keep_in(tmp_path)
        os.write(2, b"\rdistill:  10%|#         | 3/30 [00:10<01:30]")
        os.write(2, b"\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node x\n")
        os.write(2, b"\rdistill:  13%|#         | 4/30\n(MapWorker pid=12) a worker's line\nour own line\n")
        # what the raylet pushes to the driver, Ray prints to stdout
        os.write(1, b"[distill] our line\n\x1b[33m(raylet)\x1b[0m WARNING: 6 PYTHON worker processes again\n")
        _wait_for_pump()
    captured = capfd.readouterr()
    assert captured.out == "[distill] our line\n"
    err = captured.err
    assert "raylet" not in err and "PYTHON worker" not in err and "pid=12" not in err
    assert "distill:  10%|#         | 3/30 [00:10<01:30]" in err and "4/30" in err and "our own line\n" in err
    log = (tmp_path / "driver.log").read_text()
    assert "(raylet)\x1b[0m WARNING: 8 PYTHON worker processes" in log and "(MapWorker pid=12)" in log
    assert "6 PYTHON worker processes again" in log


def test_a_refusal_is_its_one_line_without_a_pointer_to_rays_messages(capfd):
    with pytest.raises(DistillError):
        with RayLinesToFile(enabled=True):
            os.write(2, b"2026-12-01 22:42:46,795\tWARNING x.py:85 -- something Ray said\n")
            _wait_for_pump()
            raise DistillError("run.resume=true with settings that differ")
    assert "Ray's messages" not in capfd.readouterr().err
    with pytest.raises(RuntimeError):  # an unexpected failure still says where Ray's messages are
        with RayLinesToFile(enabled=True):
            os.write(2, b"2026-12-01 22:42:46,795\tWARNING x.py:85 -- something Ray said\n")
            _wait_for_pump()
            raise RuntimeError("boom")
    assert "[distill] Ray's messages from this process are in" in capfd.readouterr().err
