"""Loading student folders with plain transformers, in a process where the project cannot be imported.
Both sides run transformers' quantizers eager: compare against outputs computed with set_compile(False)."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch
from safetensors.torch import load_file, save_file

SCRIPT = r"""
import json, sys
sys.modules["distillation"] = None  # the project cannot be imported here
try:
    import distillation  # noqa: F401
    raise SystemExit("the project was importable")
except ImportError:
    pass
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

# transformers wraps its BitNet quantizers in torch.compile, whose fused kernels round the last bit
# differently; the project runs them eager (student.compile=false), and so does this process.
torch.compiler.set_stance("force_eager")

folders, ids_file, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
ids = load_file(ids_file)["input_ids"]
logits, report = {}, {}
for i, folder in enumerate(folders):
    try:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    except Exception as exc:  # the refusal under test
        report[folder] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    with torch.no_grad():
        logits[str(i)] = model(input_ids=ids).logits.contiguous()
    report[folder] = {"class": type(model).__name__,
                      "linear": sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})}
save_file(logits, out + ".safetensors")
open(out + ".json", "w").write(json.dumps(report))
"""


def plain_transformers(folders: List[Path], ids: torch.Tensor, tmp: Path) -> Dict[str, dict]:
    """{folder: {"class", "linear", "logits"} or {"error"}} from `from_pretrained` in a fresh interpreter
    (cwd outside the checkout) that cannot import `distillation`."""
    save_file({"input_ids": ids.contiguous()}, str(tmp / "ids.safetensors"))
    names = [str(Path(f).resolve()) for f in folders]
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(names), str(tmp / "ids.safetensors"),
                           str(tmp / "plain")], capture_output=True, text=True, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp / "plain.json").read_text())
    logits = load_file(str(tmp / "plain.safetensors"))
    for i, name in enumerate(names):
        if str(i) in logits:
            report[name]["logits"] = logits[str(i)]
    return {str(f): report[n] for f, n in zip(folders, names)}
