"""The data side at scale, in three parts.

`corpus`: a corpus of real text (the built-in sources' documents, repeated) at 1x, 10x and 100x
CORPUS_BASE_TOKENS, as JSONL and as Parquet shards; for each, the CPU default student trains CE-only
(no teacher, so only the data path differs) for a few steps through the real `distill` command. Measured:
seconds to the first optimizer step, training tokens/s, and the peak RSS (VmHWM) of the driver, the
Mixture actor and every unit-reading worker. Goal: at 100x, time to first step and memory within
1.2x of 1x, tokens/s unchanged within noise.

`rows`: one document per training row against packed rows (data.pack_documents), on the default
job (its sources, loss and live teacher) for a few steps: fill ratio, real tokens/s, held-out
bits/byte after.

`cache`: a teacher cache of hidden-state answers (SmolLM2's width, the default row length) at 1x and
10x BASE_ROWS, written by the same code as write-through; a replica's replay measured in a fresh
process each (its peak RSS must follow `teacher.cache_memory_mb`, not the cache's size), with random
lookups of training-sized batches.

    python -m bench data [--parts corpus rows cache] [--scales 1 10 100] [--repeats 2] [--steps 12]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BASE_ROWS = 3_629  # training rows of the default corpus (3 sources, 400k tokens each at most, SmolLM2 tokenizer)
SEQ_LEN, HIDDEN = 256, 576  # the default row length; SmolLM2-135M's hidden size (fp16 on the wire and on disk)
BATCH = 4  # rows per teacher request in the default job (data.teacher_batch_size)
SIGNATURE = {"signature": "bench-data", "temperature": None, "vocab_size": 49152}


def _ids(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 49152, (rows, SEQ_LEN), dtype=np.int32)


def write_cache(root: Path, rows: int) -> float:
    """`rows` answers in shards of 256 rows (write-through's flush size); seconds taken."""
    from distillation.teachers.cache_store import TeacherCache
    from distillation.teachers.schema import TeacherOutput

    cache = TeacherCache(str(root), SIGNATURE, create=True, flush_rows=256)
    started = time.time()
    for start in range(0, rows, 256):
        n = min(256, rows - start)
        hidden = np.random.default_rng(start).standard_normal((n, SEQ_LEN, HIDDEN), dtype=np.float32)
        cache.add(_ids(n, start), TeacherOutput(hidden=hidden.astype(np.float16)))
    cache.flush()
    return time.time() - started


def replay(root: str, rows: int, batches: int, memory_mb: float, seed: int) -> dict:
    """In this (fresh) process: open, index, then `batches` lookups of BATCH random rows."""
    from distillation.cluster import peak_rss_mb
    from distillation.teachers.cache_store import TeacherCache

    started = time.time()
    cache = TeacherCache(root, SIGNATURE, create=False, memory_mb=memory_mb)
    assert len(cache) == rows, (len(cache), rows)
    index_s = time.time() - started
    ids_by_shard = {start: _ids(min(256, rows - start), start) for start in range(0, rows, 256)}
    rng = np.random.default_rng(seed)
    started = time.time()
    for _ in range(batches):
        picks = rng.integers(0, rows, BATCH)
        ids = np.stack([ids_by_shard[p - p % 256][p % 256] for p in picks])
        found, missing = cache.lookup(ids)
        assert not missing and found.hidden.shape == (BATCH, SEQ_LEN, HIDDEN)
    replay_s = time.time() - started
    return {"index_s": index_s, "tokens_per_s": batches * BATCH * SEQ_LEN / replay_s,
            "peak_rss_mb": peak_rss_mb()}


def _replay_in_fresh_process(root: Path, rows: int, batches: int, memory_mb: float, seed: int) -> dict:
    code = (f"import json; from bench.bench_data import replay; "
            f"print(json.dumps(replay({str(root)!r}, {rows}, {batches}, {memory_mb}, {seed})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"replay failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_range(values, digits=0) -> str:
    return f"{statistics.median(values):,.{digits}f} [{min(values):,.{digits}f}, {max(values):,.{digits}f}]"


# -- corpus ----------------------------------------------------------------------------------------
CORPUS_BASE_TOKENS = 1_200_000  # the old default's budget: 3 sources x 400k tokens
SHARD_BYTES = 32 << 20  # JSONL shards: several line-aligned units each
PARQUET_ROW_GROUP = 2_000  # documents per row group


def _base_documents() -> list:
    from distillation.config import load_config
    from distillation.data.sources import BYTES_PER_TOKEN, load_documents

    cfg = load_config([])
    docs = [d.text for s in cfg.data.sources
            for d in load_documents(s.name, s.kind, s.path, cfg.data.cache_dir, CORPUS_BASE_TOKENS)]
    out, size = [], 0
    for text in docs:  # the first ~CORPUS_BASE_TOKENS tokens of text, the sources in order
        if size >= CORPUS_BASE_TOKENS * BYTES_PER_TOKEN:
            break
        out.append(text)
        size += len(text.encode())
    return out


def write_corpus(root: Path, docs: list, scale: int, kind: str) -> int:
    """The base documents repeated `scale` times as shards of `kind`; bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        for copy in range(scale):  # one file per copy of the base corpus
            pq.write_table(pa.table({"text": docs}), root / f"part-{copy:05d}.parquet",
                           row_group_size=PARQUET_ROW_GROUP)
    else:
        shard, handle = 0, None
        for _ in range(scale):
            for text in docs:
                if handle is None or handle.tell() >= SHARD_BYTES:
                    if handle:
                        handle.close()
                    handle, shard = open(root / f"part-{shard:05d}.jsonl", "w"), shard + 1
                handle.write(json.dumps({"text": text}) + "\n")
        handle.close()
    return sum(p.stat().st_size for p in root.iterdir())


def _peaks(pid: int, stop: threading.Event, out: dict) -> None:
    """Every 0.2 s, the VmHWM of `pid` and of each Ray process by role: what a process peaked at is
    kept even after it exits."""
    roles = {"ray::Mixture": "mixture", "ray::UnitReader": "readers", "ray::RayTrainWorker": "train worker",
             "ray::_score": "held-out task"}
    seen: dict = {}
    while not stop.is_set():
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                hwm = next(int(line.split()[1]) / 1024 for line in (entry / "status").read_text().splitlines()
                           if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                continue
            role = "driver" if int(entry.name) == pid else next((r for t, r in roles.items() if title.startswith(t)),
                                                                 seen.get(int(entry.name), (None,))[0])
            if role:
                seen[int(entry.name)] = (role, max(hwm, seen.get(int(entry.name), (role, 0))[1]))
        stop.wait(0.2)
    for role, hwm in seen.values():
        out.setdefault(role, []).append(hwm)


def train_on(corpus: Path, kind: str, steps: int, out: Path, extra: tuple = ()) -> dict:
    """One CE-only `distill` run on the corpus: seconds to the first step, tokens/s, peak RSS by role."""
    return _distill(["distillation=ce_only", f"data.sources=[{{name: corpus, kind: {kind}, path: '{corpus}'}}]",
                     f"training.max_steps={steps}", *extra], out)


def _distill(overrides: list, out: Path) -> dict:
    """One `distill` run in a subprocess, watched: seconds to the first step, real tokens/s (median
    after the first two steps), peak RSS by role, and the summary's fill ratio and held-out score."""
    args = [*overrides, "training.eval_every=0", f"run.output_dir={out}", "run.name=data", "run.progress=false"]
    started = time.time()
    process = subprocess.Popen([sys.executable, "-m", "distillation.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[1])
    stop, peaks, first = threading.Event(), {}, [None]
    watcher = threading.Thread(target=_peaks, args=(process.pid, stop, peaks), daemon=True)
    watcher.start()
    metrics = out / "data" / "metrics.jsonl"
    while process.poll() is None:
        if first[0] is None and metrics.is_file() and metrics.stat().st_size:
            first[0] = time.time() - started
        time.sleep(0.2)
    stop.set()
    watcher.join()
    log = process.stdout.read()
    if process.returncode:
        raise RuntimeError(f"distill failed ({process.returncode}): {log[-3000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary = json.loads((out / "data" / "summary.json").read_text())
    return {"first_step_s": first[0], "wall_s": time.time() - started,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[2:]),
            "fill_ratio": summary["data"]["fill_ratio"], "tokens_seen": summary["tokens_seen"],
            "heldout_bits_per_byte": summary["heldout"]["student_after"]["bits_per_byte"],
            "peak_rss_mb": {role: max(v) for role, v in peaks.items()}, "processes": {r: len(v) for r, v in peaks.items()}}


def _ratio(last: dict, first: dict, pick) -> float:
    median = lambda row: statistics.median(pick(r) for r in row["runs"])  # noqa: E731
    return median(last) / max(1e-9, median(first))


def corpus_part(args) -> dict:
    docs = _base_documents()
    lines = ["| format | scale | on disk | first step s | tokens/s | driver MB | mixture MB | readers MB (max) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    measured = []
    for kind in args.kinds:
        for scale in args.scales:
            with tempfile.TemporaryDirectory(dir=Path.home() / ".cache") as root:
                corpus = Path(root) / "corpus"
                size = write_corpus(corpus, docs, scale, kind)
                runs = [train_on(corpus, kind, args.steps, Path(root) / f"run{r}", args.extra)
                        for r in range(args.repeats)]
            row = {"kind": kind, "scale": scale, "bytes": size, "runs": runs}
            measured.append(row)
            print(json.dumps(row), flush=True)
            peak = lambda role: [r["peak_rss_mb"].get(role, 0) for r in runs]  # noqa: E731
            lines.append(f"| {kind} | {scale}x | {size / 2**20:,.0f} MiB | "
                         f"{_median_range([r['first_step_s'] for r in runs], 1)} | "
                         f"{_median_range([r['tokens_per_s'] for r in runs])} | {_median_range(peak('driver'))} | "
                         f"{_median_range(peak('mixture'))} | {_median_range(peak('readers'))} |")
    lines.append("")
    for kind in args.kinds:
        rows = [m for m in measured if m["kind"] == kind]
        first, last = rows[0], rows[-1]
        parts = [f"{name} {_ratio(last, first, pick):.2f}x" for name, pick in (
            ("first step", lambda r: r["first_step_s"]), ("tokens/s", lambda r: r["tokens_per_s"]),
            *[(f"{role} RSS", lambda r, role=role: r["peak_rss_mb"].get(role, 0))
              for role in ("driver", "mixture", "readers")])]
        lines.append(f"{kind} {last['scale']}x against {first['scale']}x: " + ", ".join(parts) + ".")
    lines.append(f"1x = about {CORPUS_BASE_TOKENS:,} tokens ({len(docs):,} documents of the built-in "
                 f"sources); {args.repeats} runs each of {args.steps} CE-only steps of the CPU default student "
                 f"(training.batch_size 4, seq_len 256), one source; peak RSS is each process's VmHWM.")
    return {"table": "\n".join(lines), "measured": measured}


def write_short_documents(path: Path, docs: list, seed: int = 0) -> int:
    """The base documents' words cut into snippets of 8-80 words (chat-sized documents), as JSONL."""
    words = " ".join(docs).split()
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    count, start = 0, 0
    with open(path, "w") as out:
        while start < len(words):
            size = int(rng.integers(8, 80))
            out.write(json.dumps({"text": " ".join(words[start:start + size])}) + "\n")
            start, count = start + size, count + 1
    return count


def rows_part(args) -> dict:
    """One document per row against packed rows (data.pack_documents) on the default job's loss and
    live teacher, over the built-in sources (long documents) and over the same text cut into short
    documents: the same rows and steps, so the same positions; packing turns padding into real tokens."""
    lines = ["| corpus | training rows | fill ratio | real tokens/s | real tokens trained | held-out bits/byte after "
             "| wall s |", "|---|---|---:|---:|---:|---:|---:|"]
    measured, notes = [], []
    for corpus in args.rows_corpora:
        pair = []
        for pack in (False, True):
            with tempfile.TemporaryDirectory(dir=Path.home() / ".cache") as root:
                sources = []
                if corpus == "short":
                    path = Path(root) / "short" / "docs.jsonl"
                    write_short_documents(path, _base_documents())
                    sources = [f"data.sources=[{{name: short, kind: jsonl, path: '{path.parent}'}}]"]
                runs = [_distill([*sources, f"data.pack_documents={str(pack).lower()}",
                                  f"training.max_steps={args.steps}"], Path(root) / f"run{r}")
                        for r in range(args.repeats)]
            row = {"corpus": corpus, "pack_documents": pack, "runs": runs}
            pair.append(row)
            print(json.dumps(row), flush=True)
            lines.append(f"| {corpus} | {'packed' if pack else 'one document each'} | "
                         f"{_median_range([r['fill_ratio'] for r in runs], 3)} | "
                         f"{_median_range([r['tokens_per_s'] for r in runs])} | "
                         f"{_median_range([r['tokens_seen'] for r in runs])} | "
                         f"{_median_range([r['heldout_bits_per_byte'] for r in runs], 3)} | "
                         f"{_median_range([r['wall_s'] for r in runs])} |")
        measured += pair
        notes.append(f"{corpus}: packed against one document per row, real tokens/s "
                     f"{_ratio(pair[1], pair[0], lambda r: r['tokens_per_s']):.2f}x, fill ratio "
                     f"{_ratio(pair[1], pair[0], lambda r: r['fill_ratio']):.2f}x.")
    lines += ["", " ".join(notes), f"{args.repeats} runs each of {args.steps} steps of the default job (BitDistill "
              f"loss, live transformers teacher, seq_len 256); `builtin`: the three built-in sources; `short`: their "
              f"first ~{CORPUS_BASE_TOKENS:,} tokens of text cut into documents of 8-80 words, one JSONL source. "
              f"Held-out rows are one document each in both arms (each corpus has its own held-out set)."]
    return {"table": "\n".join(lines), "measured": measured}


def cache_part(args) -> dict:
    row_mb = SEQ_LEN * HIDDEN * 2 / 2**20
    lines = ["| scale | rows | cache on disk | write s | index s | replay tokens/s | replica peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    measured = []
    for scale in args.scales:
        rows = BASE_ROWS * scale
        with tempfile.TemporaryDirectory(dir=Path.home() / ".cache") as root:
            write_s = write_cache(Path(root), rows)
            disk = sum(p.stat().st_size for p in Path(root).rglob("*.parquet")) / 2**30
            runs = [_replay_in_fresh_process(Path(root), rows, args.batches,
                                             args.memory_mb, seed) for seed in range(args.repeats)]
        row = {"scale": scale, "rows": rows, "disk_gib": disk, "write_s": write_s, "runs": runs}
        measured.append(row)
        print(json.dumps(row), flush=True)
        lines.append(f"| {scale}x | {rows:,} | {disk:.1f} GiB | {write_s:.0f} | "
                     f"{statistics.median(r['index_s'] for r in runs):.2f} | "
                     f"{_median_range([r['tokens_per_s'] for r in runs])} | "
                     f"{_median_range([r['peak_rss_mb'] for r in runs])} |")
    first, last = measured[0], measured[-1]
    ratio = lambda key: (statistics.median(r[key] for r in last["runs"])  # noqa: E731
                         / statistics.median(r[key] for r in first["runs"]))
    lines.append("")
    lines.append(f"{last['scale']}x against {first['scale']}x: replica peak RSS {ratio('peak_rss_mb'):.2f}x, replay "
                 f"tokens/s {ratio('tokens_per_s'):.2f}x. Rows of {row_mb:.2f} MiB (hidden states, {SEQ_LEN} x "
                 f"{HIDDEN} fp16); {args.repeats} replays of {args.batches} random batches of {BATCH} rows each, "
                 f"every replay in a fresh process with teacher.cache_memory_mb={args.memory_mb:g}.")
    return {"table": "\n".join(lines), "measured": measured}


def main(argv=None) -> dict:
    (Path.home() / ".cache").mkdir(exist_ok=True)  # the scratch corpora go there (a disk, not a tmpfs)
    parser = argparse.ArgumentParser(prog="python -m bench data")
    parser.add_argument("--parts", nargs="+", choices=["corpus", "rows", "cache"], default=["corpus", "rows", "cache"])
    parser.add_argument("--scales", type=int, nargs="+", default=None, help="corpus: 1 10 100; cache: 1 10")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--memory-mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows-corpora", nargs="+", choices=["builtin", "short"], default=["builtin", "short"])
    parser.add_argument("--kinds", nargs="+", choices=["jsonl", "parquet"], default=["jsonl", "parquet"])
    parser.add_argument("--extra", nargs="*", default=[], help="corpus: overrides added to every run")
    args = parser.parse_args(argv)
    tables, measured = [], {}
    for part, scales, run in (("corpus", [1, 10, 100], corpus_part), ("rows", [], rows_part),
                              ("cache", [1, 10], cache_part)):
        if part in args.parts:
            got = run(argparse.Namespace(**{**vars(args), "scales": args.scales or scales}))
            tables.append(f"**{part}**\n\n" + got["table"])
            measured[part] = got["measured"]
    return {"table": "\n\n".join(tables), "measured": measured, "settings": vars(args)}


if __name__ == "__main__":
    print(main()["table"])
