"""Shared fixtures: tiny real transformers models (random init, safetensors on disk)."""

import socket
import time
from pathlib import Path

import pytest
import torch

# Modules by their time in the suite, longest first (measured: bench/README.md, "The test suite").
LONGEST_FIRST = ("test_driver.py", "training/test_ddp.py", "test_end_to_end.py", "training/test_fault_tolerance.py",
                 "teachers/test_vllm.py", "test_job_submit.py", "training/test_influence.py", "test_placement.py")


def pytest_collection_modifyitems(config, items):
    """The longest modules first, then the other end-to-end ones, then the rest: `make test` runs
    `pytest -n 2 --dist loadfile --no-loadscope-reorder`, each module whole on one worker in this
    order, so the many short modules fill the end instead of one long module finishing alone."""
    def rank(item):
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        if path in LONGEST_FIRST:
            return LONGEST_FIRST.index(path)
        return len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)
    items.sort(key=rank)  # stable: file order otherwise kept


def free_port() -> int:
    """A loopback port nothing listens on now (a fixed one may belong to another cluster here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo_ranks(body, *args, world: int = 2) -> None:
    """`body(rank, *args)` on `world` real gloo processes (one thread each) on the loopback."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(free_port(), world, body, args), nprocs=world, join=True)


def _gloo_rank(rank: int, port: int, world: int, body, args: tuple) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        body(rank, *args)
        # body's models are freed by now, before the group: a DDP reducer freed after it, with the
        # peer gone, hung one rank in its destructor (2 runs in 10)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def tiny_llama_config(vocab_size=128, layers=2, hidden=64, heads=4, kv_heads=2, **extra):
    from transformers import LlamaConfig

    extra = {"tie_word_embeddings": True, **extra}
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=512, **extra)


@pytest.fixture
def tiny_llama():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config())


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2 model folder (registry download + dense copy, cached across runs)."""
    from distillation.config import load_config
    from distillation.models import resolve_model

    return resolve_model("smollm2-135m-instruct", load_config().data.cache_dir)


@pytest.fixture(scope="session")
def cache_dir():
    """The default cache (data.cache_dir), where built-in models, text and tasks are kept."""
    from distillation.config import load_config

    return load_config().data.cache_dir


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster (2 CPUs, like the CI machine) shared by the slow tests."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never another cluster on this machine
    yield
    serve.shutdown()
    ray.shutdown()


def save_tiny_llama(out: Path, seed: int = 0, **config) -> Path:
    """A random-init tiny Llama (`tiny_llama_config(**config)`, seeded) saved to `out`, no tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_llama_config(**config)).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A module's tiny two-layer Llama folder (vocabulary 128, seed 0, no tokenizer)."""
    return save_tiny_llama(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def tiny_dir_one_layer(tmp_path_factory):
    """As `tiny_dir` with one layer: lighter for a module that starts many replica processes."""
    return save_tiny_llama(tmp_path_factory.mktemp("pool-teacher"), layers=1)


def tiny_model_dir(root: Path, vocab_size: int, seed: int, smollm2: Path, **config) -> Path:
    from transformers import AutoTokenizer

    out = save_tiny_llama(root / f"tiny-{vocab_size}-{seed}", seed, vocab_size=vocab_size, **config)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(out)
    return out


def tiny_student(seed: int = 0):
    """A tiny BitNet student (vocabulary 97, SubLN "paper") for the training pieces without Ray."""
    from transformers import AutoModelForCausalLM

    from distillation.student import convert_to_bitnet

    torch.manual_seed(seed)
    return convert_to_bitnet(AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=97)), "paper")


def tiny_optimizer(model):
    """AdamW (lr 1e-3) and the run's LR schedule (2 warm-up steps, 10 steps, floor 0.1) for `model`."""
    from omegaconf import OmegaConf

    from distillation.training.step import lr_lambda

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tcfg = OmegaConf.create({"warmup_steps": 2, "max_steps": 10, "min_lr_ratio": 0.1})
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))


def pids_titled(title: str) -> list[int]:
    """Pids of this process's descendants whose command line names `title` (Ray sets the actor class
    as the process title); processes that end or turn zombie while being listed are skipped."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if any(title in part for part in process.cmdline()):
                found.append(process.pid)
        except psutil.Error:  # ended since it was listed
            pass
    return found


def in_background(fn):
    """Run `fn` on a daemon thread; what it raised is kept in `thread.errors` for the test to show."""
    import threading

    errors = []

    def guarded():
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - reported by the test, not lost on the thread
            errors.append(error)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.2, details=None):
    """Poll `condition` until it holds; past `timeout_s` fail naming `what` (and `details()`, if given)."""
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            extra = f"; {details()}" if details else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{extra}")
        time.sleep(poll_s)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, smollm2_dir):
    return tiny_model_dir(tmp_path_factory.mktemp("models"), 49152, seed=1, smollm2=smollm2_dir)


def tiny_overrides(model_dir: Path, out: Path, steps: int = 4):
    return [f"teacher.model={model_dir}", "student.num_layers=null", f"run.output_dir={out}", "run.name=e2e",
            "run.progress=false", "data.seq_len=64", "data.max_tokens_per_source=20000", "data.heldout_sequences=2",
            "data.heldout_fraction=0.2", "data.readers=1", f"training.max_steps={steps}", "training.batch_size=2",
            "training.grad_accum=2",
            "training.warmup_steps=1", "distillation.split_heads=4", "distillation.teacher_layer=-1",
            "distillation.student_layer=-1", "teacher.top_k=16", "training.num_threads=1"]


def jsonl_corpus(root: Path, files: int, docs_per_file: int, seed: int = 0) -> Path:
    """A folder of JSONL files of real English text (the Python reference docs, cut into snippets of
    about 40-400 characters, shuffled by `seed`, each led by its own number so no two are alike): many
    small documents, one row each at seq_len 64."""
    import json
    from pydoc_data.topics import topics

    import numpy as np

    words = " ".join(topics.values()).split()
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        starts = rng.integers(0, len(words) - 80, docs_per_file)
        sizes = rng.integers(8, 80, docs_per_file)
        with open(root / f"part-{f:04d}.jsonl", "w") as out:
            for i, (start, size) in enumerate(zip(starts, sizes)):
                out.write(json.dumps({"text": f"{f}.{i}. " + " ".join(words[start:start + size])}) + "\n")
    return root


def jsonl_mixture_inputs(root: Path, tokenizer_dir: Path, names=("a", "b"), files: int = 6, docs_per_file: int = 40,
                         seq_len: int = 64):
    """(specs, recipe, pool) for a Mixture actor over one JSONL corpus per name (no held-out split)."""
    from distillation.data.rows import RowRecipe
    from distillation.data.sources import open_source

    specs = {n: open_source(n, "jsonl", str(jsonl_corpus(root / n, files, docs_per_file, seed=i)), "unused")
             for i, n in enumerate(names)}
    recipe = RowRecipe(str(tokenizer_dir), seq_len, 0.0, 0.0)
    pool = {}
    for name, spec in specs.items():
        first = recipe.cut(spec, spec.units[0])["train"]
        pool[name] = first.take(slice(0, 4))
    return specs, recipe, pool
