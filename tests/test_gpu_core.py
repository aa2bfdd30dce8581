"""The GPU core check (bench/gpu_core.py) runs where only torch, transformers and small wheels are:
here on CPU with tiny shapes, from source, with Ray and vLLM made unimportable."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_RAY = ("import runpy, sys; sys.modules.update(ray=None, vllm=None); sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_the_gpu_core_check_runs_without_ray_and_reports_every_arm(tmp_path):
    out = tmp_path / "core.json"
    done = subprocess.run([sys.executable, "-c", NO_RAY, str(ROOT / "bench" / "gpu_core.py"), "--tiny", "--reps", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"fused loss (float32)", "fused loss (bfloat16)", "compiled quantizers (mix 1.0)",
            "compiled quantizers (mix 0.5)"} <= set(result["checks"])
    assert result["checks"]["fused loss (float32)"] < 1e-5
    arms = [r["arm"] for r in result["steps"]]
    assert arms == ["plain, CE", "BitNet, CE", "BitNet, CE + KD (hidden)", "+ attention relations",
                    "BitNet CE, compiled (quantizers and loss)", "+ attention relations, compiled (experiment=gpu)",
                    "BitNet, CE + KD, activation checkpointing"]
    assert [r["activation_checkpointing"] for r in result["steps"]] == [False] * 6 + [True]
    assert all(r["tokens_per_s"] > 0 for r in result["steps"])
    assert {r["variant"] for r in result["losses"] if "seconds" in r} == {"ours (fused head)", "ours (fused head), compiled",
                                                                          "naive dense"}
    assert "| tiny llama | BitNet, CE + KD (hidden) |" in result["table"]
