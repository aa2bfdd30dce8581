"""`ray job submit --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/distill.py
<overrides>` against a real `ray start --head` on loopback (its own cluster, token authentication
as configured, separate from the session's test cluster)."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, tiny_overrides

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_ray_job_submit_runs_the_distill_entry_point_on_a_loopback_head(tiny_teacher, tmp_path):
    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # Ray's socket paths must stay short
    gcs_port, dashboard_port = free_port(), free_port()
    # Token authentication on, with a token of this test's own that the head and the client share.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # an activated venv: `python` is ours
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs_port}",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard_port}", "--num-cpus=2", "--include-dashboard=true",
                             # the session's test cluster holds the default agent ports on this machine
                             f"--dashboard-agent-listen-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                             f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        # Checkpoints and the final student go to shared storage (a URI here), not the job's working folder.
        overrides = tiny_overrides(tiny_teacher, tmp_path / "out", steps=2) + [f"run.storage_path=file://{tmp_path}/shared"]
        deadline, result = time.time() + 120, None
        while time.time() < deadline:  # the dashboard's job API takes a moment to come up
            result = subprocess.run([str(bin_dir / "ray"), "job", "submit", f"--address={address}",
                                     "--working-dir", str(ROOT), "--runtime-env",
                                     str(ROOT / "ray_jobs" / "runtime_env.yaml"), "--",
                                     "python", "ray_jobs/distill.py", *overrides],
                                    env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
            starting = ("Connection refused", "Failed to connect", "No available agent")  # head still coming up
            if not any(text in result.stderr + result.stdout for text in starting):
                break
            time.sleep(3)
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-4000:]
        assert "succeeded" in log and "=== distillation summary ===" in log
        assert (tmp_path / "out" / "e2e" / "student" / "config.json").is_file()
        shared = tmp_path / "shared" / "e2e"
        assert (shared / "student" / "config.json").is_file() and (shared / "summary.json").is_file()
        assert list((shared / "train").glob("checkpoint_*")) and not (tmp_path / "out" / "e2e" / "ray").exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
