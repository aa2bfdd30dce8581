#!/usr/bin/env bash
# The wheels bench/gpu_core.py needs on a GPU machine that has torch, triton and CUDA but no package
# registry, fetched here into .whl/ (git-ignored, about 15 MB: under the 64 MiB a device call carries).
# On the GPU machine, with .whl/ carried:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:$PWD/src python3 bench/gpu_core.py --out gpu-core.json
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
mkdir -p .whl
# pure-Python wheels for any platform, at the versions pyproject.toml pins
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any -d .whl \
  transformers==5.19.0 hydra-core==1.3.8 omegaconf==2.3.1 liger-kernel==0.8.5
# hydra's parser runtime exists only as an sdist on the registry: build its (pure-Python) wheel here
"$PIP" wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl
