"""The whole path on a real local Ray cluster: Serve teacher -> Ray Data -> TorchTrainer -> checkpoint.

Tiny random-init Llama models that share SmolLM2's real tokenizer keep it fast; nothing is mocked.
"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import jsonl_corpus, tiny_model_dir, tiny_overrides
from distillation.config import load_config

pytestmark = pytest.mark.slow


def _signal(cfg) -> dict:
    from distillation.teachers.cache_store import signal_settings

    return signal_settings(cfg.teacher, cfg.distillation.temperature, -1, 49152)


def test_distill_runs_serve_data_train_and_writes_a_strict_checkpoint(tiny_teacher, ray_cluster, tmp_path):
    from ray import serve

    from distillation.run import run
    from distillation.student import load_student

    cfg = load_config(tiny_overrides(tiny_teacher, tmp_path) + ["student.export=[packed,gguf]"])
    summary = run(cfg)

    assert summary["steps"] == 4
    # steps x grad_accum x batch x seq_len rows; padding of a document's last piece is not counted
    assert 0.8 * 4 * 2 * 2 * 64 < summary["tokens_seen"] <= 4 * 2 * 2 * 64
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    first, last = rows[0], rows[-1]
    assert last["loss"] < first["loss"]
    for key in ("ce", "attention"):
        assert first[key] > 0 and last[key] > 0  # every component was computed from teacher answers
    # The default hidden signal: an exact KL of two different models, strictly positive (the sampled
    # signal, an estimate, is the next test's)
    assert summary["teacher"]["signal"] == "hidden" and first["logits_kl"] > 0 and last["logits_kl"] > 0
    assert Path(summary["loss_plot"]).stat().st_size > 0

    student_dir = Path(summary["student_checkpoint"])
    student = load_student(student_dir)  # strict: a missing or extra tensor would raise
    assert student.config.bitnet["subln"] == "paper"
    assert (student_dir / "tokenizer.json").is_file()
    saved_cfg = (student_dir / "distill_config.yaml").read_text()
    assert "max_steps: 4" in saved_cfg and f"model: {tiny_teacher}" in saved_cfg
    _check_exports(student, student_dir, summary["exports"], tmp_path)

    h = summary["heldout"]  # 4 steps do not move a random-init student's CE; the default run shows that
    assert 0 < h["student_after"]["bits_per_byte"] < 40 and 0 < h["teacher"]["bits_per_byte"] < 40
    ledger = [json.loads(line) for line in Path(summary["ledger"]).read_text().splitlines()]
    assert [e["step"] for e in ledger] == [1, 2, 3, 4]
    assert [s[0] for e in ledger for s in e["samples"]] == list(range(16))  # every sample once, in order
    assert not serve.status().applications.get("teacher-e2e")  # the teacher pool was taken down


def _check_exports(student, student_dir: Path, exports: dict, tmp_path: Path) -> None:
    """The run's student/ loads in plain transformers as the same model; the exports it asked for
    (student.export) sit beside it: the packed folder and a GGUF llama.cpp reads."""
    import torch

    from distillation.models import load_tokenizer
    from distillation.student import load_student, set_compile
    from distillation.student.generate import open_gguf
    from plain_transformers import plain_transformers

    set_compile(False)
    ids = torch.randint(0, 49152, (2, 16))
    with torch.no_grad():
        expected = student.eval()(input_ids=ids).logits
    plain = plain_transformers([student_dir], ids, tmp_path)[str(student_dir)]
    assert plain["class"] == "BitNetForCausalLM"
    torch.testing.assert_close(plain["logits"], expected, rtol=0, atol=0)
    assert exports == {"packed": str(student_dir.parent / "student-packed"), "gguf": str(student_dir.parent / "student.gguf")}
    packed = load_student(exports["packed"]).eval()
    _check_packed_layers(student, packed, ids)
    with torch.no_grad():
        logits = packed(input_ids=ids).logits
    # Whole-model logits agree up to int8 activations that float noise upstream (another summation
    # order) rounds the other way: each such flip moves later positions' logits by ~1e-3, where a
    # wrong embedding, norm or head would move them by the logits' own size.
    gap = (logits - expected).abs()
    assert gap.mean() < 0.01 * expected.abs().mean() and gap.max() < 5e-2
    llm = open_gguf(exports["gguf"])
    text = "Distillation keeps 1.58 bits per weight."
    assert llm.tokenize(text.encode(), add_bos=False) == load_tokenizer(student_dir)(text)["input_ids"]
    llm.close()


def _check_packed_layers(student, packed, ids) -> None:
    """Each packed layer, given the online layer's own input, gives its output (int8 activations
    rounded alike, the 2-bit codes and scale exact): equal up to summation order."""
    import torch

    inputs, outputs = {}, {}

    def keep(name):
        def hook(_module, args, out):
            inputs[name], outputs[name] = args[0].detach(), out.detach()
        return hook
    handles = [m.register_forward_hook(keep(n)) for n, m in student.named_modules() if hasattr(m, "online_quant")]
    with torch.no_grad():
        student(input_ids=ids)
    for handle in handles:
        handle.remove()
    layers = dict(packed.named_modules())
    assert len(inputs) == 14 and all(type(layers[n]).__name__ == "TernaryLinear" for n in inputs)
    with torch.no_grad():
        for name, x in inputs.items():
            torch.testing.assert_close(layers[name](x), outputs[name], rtol=0, atol=1e-5, msg=name)


def _chats(folder: Path, count: int = 60) -> Path:
    """A JSONL of real conversations: a question about a topic of Python's reference docs, answered
    with the topic's first words."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "chats.jsonl", "w") as out:
        for name, text in sorted(topics.items())[:count]:
            answer = " ".join(text.split()[:8])
            out.write(json.dumps({"messages": [{"role": "user", "content": f"What is '{name}' about?"},
                                               {"role": "assistant", "content": answer}]}) + "\n")
    return folder


def test_the_three_stages_run_as_one_recipe_on_chat_records_with_the_loss_on_the_answers(tiny_teacher, ray_cluster,
                                                                                        tmp_path):
    """recipe.stages: the teacher fine-tuned in full precision on conversations, the converted student
    pre-trained on 300k plain-text documents (read lazily), then distilled from that teacher on the
    conversations, through the mixture, the teacher pool (the sampled signal: the hidden one is the
    first test's, top-k test_vllm's) and the trainer. The held-out score counts exactly the answers' tokens and their EOS,
    as the tokenizer itself splits them, of every held-out record; the task is scored throughout. A
    second call finds every stage done."""
    from distillation.data.sources import split_of
    from distillation.models import load_tokenizer
    from distillation.recipe import run_recipe, stage_configs
    from distillation.run import run

    chats = _chats(tmp_path / "chats")
    corpus = jsonl_corpus(tmp_path / "corpus", files=60, docs_per_file=5_000)  # stage 2's: 300k documents, ~75 MB
    overrides = [o for o in tiny_overrides(tiny_teacher, tmp_path, steps=2) if not o.startswith(("run.name", "data.max"))]
    source = f"{{name: chats, kind: jsonl, path: {chats}, format: messages}}"
    cfg = load_config(overrides + [
        "run.name=recipe", "teacher.signal=sampled", "teacher.draws=6",
        f"data.sources=[{source}]", "data.heldout_sequences=100", "data.probe_fraction=0.1", "training.eval_every=2",
        "task.name=topics", f"task.test={source}", "task.metrics=[rouge_l,exact_match]", "task.records=3",
        "task.max_new_tokens=3", "recipe.stages=[teacher_sft,pretrain,distill]", "recipe.teacher_sft_steps=2",
        "recipe.pretrain_steps=3", f"recipe.pretrain_sources=[{{name: big, kind: jsonl, path: {corpus}}}]"])
    report = run_recipe(cfg, run)
    root = tmp_path / "recipe"
    assert list(report["stages"]) == ["teacher_sft", "pretrain", "distill"]
    assert json.loads((root / "recipe.json").read_text())["stages"] == report["stages"]

    # Stage 0: the teacher itself, full precision, a folder plain transformers (and teacher.model) reads.
    teacher_dir = root / "teacher_sft" / "student"
    assert "bitnet" not in json.loads((teacher_dir / "config.json").read_text())
    sft = json.loads((root / "teacher_sft" / "summary.json").read_text())
    assert sft["steps"] == 2 and sft["teacher"] is None and "task" in sft["heldout"]["student_after"]  # FP-SFT's score
    # Stage 2: CE on plain text, no teacher loaded; stage 3: from stage 2's student and stage 0's teacher.
    pretrain = json.loads((root / "pretrain" / "summary.json").read_text())
    assert pretrain["steps"] == 3 and pretrain["teacher"] is None and pretrain["heldout"]["teacher"] is None
    _streamed_lazily(pretrain, stage_configs(cfg, root, {"teacher_sft": str(teacher_dir)})["pretrain"], tiny_teacher)
    distill_yaml = (root / "distill" / "config.yaml").read_text()
    assert f"model: {teacher_dir}" in distill_yaml and f"checkpoint_path: {root / 'pretrain' / 'student'}" in distill_yaml

    summary = json.loads((root / "distill" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["teacher"]["signal"] == "sampled"
    assert summary["last"]["logits_kl"] != 0  # an unbiased estimate: any sign on one batch, never exactly zero
    held = summary["heldout"]  # the task scored before and after training, by the teacher, and at step 2
    for who in ("student_before", "student_after", "teacher"):
        assert held[who]["task"]["examples"] == 3 and 0 <= held[who]["task"]["rouge_l"] <= 1
    assert {"task_rouge_l", "task_exact_match"} <= set(summary["last"])
    tokenizer = load_tokenizer(tiny_teacher)
    answers, offset = [], 0
    for line in open(chats / "chats.jsonl", "rb"):
        if split_of(f"chats/chats.jsonl@{offset}", 0.2) == "heldout":
            answers.append(json.loads(line)["messages"][1]["content"])
        offset += len(line)
    want = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)  # + <|im_end|>
    assert len(answers) >= 5 and held["student_after"]["tokens"] == want

    def no_run(stage_cfg):
        raise AssertionError(f"stage {stage_cfg.run.name} ran again")
    assert run_recipe(cfg, no_run)["stages"] == report["stages"]  # every stage done: nothing runs


def _streamed_lazily(summary: dict, cfg, tokenizer_dir: Path) -> None:
    """Far more documents than the old in-memory path took (it capped a source at 400k tokens): the
    run read only the units its steps drew from, and no held-out or probe row was ever trained on."""
    from distillation.data.corpus import open_sources, row_recipe
    from distillation.training.metrics import read_jsonl

    spec, recipe = open_sources(cfg.data)["big"], row_recipe(cfg.data, str(tokenizer_dir))
    assert summary["data"]["units"] == {"big": len(spec.units)} and len(spec.units) >= 60
    assert summary["data"]["units_read"] <= 2 * cfg.data.shuffle_units  # the block in use and the next one
    assert 0 < summary["peak_rss_mb"]["mixture"] < 1000 and 0 < summary["peak_rss_mb"]["driver"]
    trained, held = set(), set()
    for entry in read_jsonl(Path(summary["ledger"])):
        for _, source, unit, row in entry["samples"]:
            parts = recipe.cut(spec, spec.units[unit])
            trained.add(parts["train"].rows[row].tobytes())
            held |= {r.tobytes() for name in ("heldout", "probe") for r in parts[name].rows}
    assert len(trained) == 3 * 2 * 2 and held  # every trained row is a training row of its unit ...
    assert not trained & held  # ... and none is a held-out or probe row


def test_packed_rows_are_precomputed_and_the_run_replays_them_without_a_teacher_model(tiny_teacher, ray_cluster,
                                                                                    tmp_path):
    """data.pack_documents=true with the cached teacher, end to end: the precompute job scores every
    packed training row of two sources (a rerun scores none), the run draws the same rows (every one
    found in the cache, whose keys include the positions) without loading the teacher anywhere, rows
    are fuller than one document per row, and the ledger's rows are packed training rows of their units."""
    from distillation.data.corpus import fill_ratio, open_sources, row_recipe
    from distillation.precompute import precompute
    from distillation.run import run
    from distillation.teachers.cache_store import TeacherCache, teacher_signature
    from distillation.teachers.hf import HFTeacher
    from distillation.training.metrics import read_jsonl

    corpora = [jsonl_corpus(tmp_path / name, files=2, docs_per_file=150, seed=seed)  # documents of 10-100 tokens
               for seed, name in enumerate(("short", "other"))]
    overrides = [o for o in tiny_overrides(tiny_teacher, tmp_path) if not o.startswith(("run.name", "data.seq_len"))] + [
        "data.seq_len=128", "data.pack_documents=true", "teacher=cached", f"teacher.cache_dir={tmp_path / 'cache'}",
        "teacher.signal=sampled",
        f"data.sources=[{{name: short, kind: jsonl, path: {corpora[0]}}}, {{name: other, kind: jsonl, path: {corpora[1]}}}]"]
    filled = precompute(load_config(overrides))
    assert filled["planned"] > 4 * 2 * 2 and filled["cached"] == filled["scored"] > 0  # every training row
    assert precompute(load_config(overrides))["scored"] == 0  # a rerun scores nothing new

    summary = run(load_config(overrides + ["run.name=packed"]))
    assert summary["steps"] == 4 and summary["teacher"]["kind"] == "cached"
    assert summary["teacher"]["misses"] == 0 and summary["teacher"]["hits"] == 4 * 2 * 2
    assert summary["heldout"]["teacher"] is None  # the driver did not load the teacher either
    assert summary["last"]["attention"] > 0 and summary["last"]["logits_kl"] != 0

    cfg = load_config(overrides)
    specs, packed_recipe = open_sources(cfg.data), row_recipe(cfg.data, str(tiny_teacher))
    trained_documents, units = 0, set()
    for entry in read_jsonl(Path(summary["ledger"])):
        for _, source, unit, row in entry["samples"]:
            spec = specs[cfg.data.sources[source].name]
            trained_documents += int((packed_recipe.cut(spec, spec.units[unit])["train"].positions[row] == 0).sum())
            units.add((spec.name, unit))
    assert trained_documents > 16  # rows held several documents
    one_per_row = replace(packed_recipe, pack_documents=False)
    unpacked_fill = fill_ratio([one_per_row.cut(specs[n], specs[n].units[u])["train"] for n, u in units])
    assert summary["data"]["fill_ratio"] > max(0.9, unpacked_fill + 0.3), unpacked_fill

    # The precompute job scored rows in batches on Ray Data actors; a live teacher scoring one row
    # alone draws the same sampled targets for it (the last unit of each source: precompute read them all).
    cache = TeacherCache(cfg.teacher.cache_dir, teacher_signature(tiny_teacher, _signal(cfg)),
                         create=False)
    live = HFTeacher(tiny_teacher, top_k=cfg.teacher.top_k, temperature=cfg.distillation.temperature, qkv_layer=-1,
                     dtype=cfg.teacher.dtype, signal=cfg.teacher.signal, draws=cfg.teacher.draws)
    for spec in specs.values():
        train = packed_recipe.cut(spec, spec.units[-1])["train"]
        row = next(i for i, p in enumerate(train.positions) if (p == 0).sum() > 1)  # a row of several documents
        cached, missing = cache.lookup(train.rows[row:row + 1], train.positions[row:row + 1])
        assert not missing and cache.lookup(train.rows[row:row + 1])[1] == [0]  # the key is the row and its positions
        np.testing.assert_array_equal(cached.sampled_ids,
                                      live.score(train.rows[row:row + 1], train.positions[row:row + 1]).sampled_ids)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "distillation.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


LAST_LAYERS = ["distillation.teacher_layer=-1", "distillation.student_layer=-1"]  # the tiny models have 2


@pytest.mark.parametrize("make_args,message", [
    (lambda d, out: [f"student.checkpoint_path={out}/missing"], "does not exist"),
    (lambda d, out: ["training.max_step=3"], "did you mean 'training.max_steps'"),
    (lambda d, out: [f"teacher.model={d['teacher']}", f"student.init_from={d['small_vocab']}",
                     "student.num_layers=null"], "vocabularies differ"),
    (lambda d, out: [f"teacher.model={d['teacher']}", "teacher=cached", f"teacher.cache_dir={out}/../empty",
                     "student.num_layers=null"], "no teacher cache for this teacher"),
    (lambda d, out: [f"teacher.model={d['teacher']}", "student.num_layers=null", "distillation.split_heads=7",
                     "distillation.teacher_layer=-1", "distillation.student_layer=-1"],
     "split_heads=7 does not divide the teacher's q width 64"),
    (lambda d, out: [f"teacher.model={d['teacher']}", "student.num_layers=null", "data.seq_len=100000"],
     "data.seq_len=100000 exceeds the teacher's 512 positions"),
    (lambda d, out: ["data.sources=[{name: mine, kind: jsonl, path: /nonexistent/chats}]"],
     "jsonl source path '/nonexistent/chats' does not exist"),
    (lambda d, out: ["data.sources=[{name: a, kind: python_docs, weight: -1}, {name: b, kind: python_docs}]"],
     "source weights must be finite, non-negative"),
    (lambda d, out: [f"data.sources=[{{name: latin1, kind: text, path: {d['latin1']}}}]"], "is not UTF-8"),
    (lambda d, out: [f"data.sources=[{{name: none, kind: jsonl, path: {d['empty']}}}]"], "holds no .jsonl/.json files"),
    (lambda d, out: [f"teacher.model={d['teacher']}", "student.ternary=false", "student.num_layers=null",
                     "student.export=[gguf]", *LAST_LAYERS], "a full-precision model (student.ternary=false) is written only as hf"),
])
def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(tiny_teacher, smollm2_dir, tmp_path, make_args,
                                                                 message, capsys):
    """In-process through the CLI's entry point (its return value is the exit status; the next test
    checks that a real process exits with it)."""
    from distillation import cli

    latin1 = tmp_path / "latin1"
    latin1.mkdir()
    (latin1 / "café.txt").write_bytes("café crème".encode("latin-1"))
    dirs = {"teacher": tiny_teacher, "small_vocab": tiny_model_dir(tmp_path, 128, seed=2, smollm2=smollm2_dir),
            "latin1": latin1, "empty": tmp_path / "empty_folder"}
    dirs["empty"].mkdir()
    out = tmp_path / "outputs"
    assert cli.main([*make_args(dirs, out), f"run.output_dir={out}"]) == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr and not out.exists()


def test_bad_input_ends_the_process_with_status_2_and_one_line(tmp_path):
    out = tmp_path / "outputs"
    result = _cli("training.max_step=3", f"run.output_dir={out}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: unknown config key 'training.max_step'; did you mean "
                                          "'training.max_steps'?"], result.stderr[-2000:]
    assert not out.exists()
