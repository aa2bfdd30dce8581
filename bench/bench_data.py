"""The data side at scale. Part `cache`: a teacher cache of hidden-state answers (SmolLM2's width,
the default row length) at 1x and 10x the default corpus's training rows, written by the same code as
write-through; a replica's replay measured in a fresh process each (its peak RSS must follow
`teacher.cache_memory_mb`, not the cache's size), with random lookups of training-sized batches.

    python -m bench data [--scales 1 10] [--batches 300] [--memory-mb 512]

The corpus half of the issue (streaming 1x/10x/100x Parquet and JSONL corpora) waits for the
streaming data path; today the corpus passes through the driver (README, known limits).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
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
    from distillation.teachers.cache import TeacherCache
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
    from distillation.teachers.cache import TeacherCache

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
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    fork and exec, so a fresh child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _replay_in_fresh_process(root: Path, rows: int, batches: int, memory_mb: float, seed: int) -> dict:
    code = (f"import json; from bench.bench_data import replay; "
            f"print(json.dumps(replay({str(root)!r}, {rows}, {batches}, {memory_mb}, {seed})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"replay failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_range(values) -> str:
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}, {max(values):,.0f}]"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench data")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--memory-mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
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
    return {"table": "\n".join(lines), "measured": measured, "settings": vars(args)}


if __name__ == "__main__":
    print(main()["table"])
