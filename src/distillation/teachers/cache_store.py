"""Teacher answers on disk: Parquet shards keyed by content hash, under a signature of who answered.

Layout: `<cache_dir>/<signature>/signature.json` (the teacher identity and signal settings the
signature hashes) and `*.parquet` shards with a `key` column (sha256 of the token ids) and one
binary column per `TeacherOutput` field holding that row's array, in row groups of about 1 MiB.
Replicas page: they index keys and read the row groups a lookup needs, never the whole cache.
Answers from another teacher, or the same teacher with another top-k, temperature, layer or
vocabulary, live under another signature, so a cache can never replay targets that do not match the run.
"""

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distillation.config.schema import TeacherConfig
from distillation.errors import DistillError
from distillation.teachers.schema import DTYPES, TeacherOutput

ROW_FIELDS = tuple(name for name in DTYPES if name != "temperature")  # temperature is in the signature
ROW_GROUP_BYTES = 1 << 20  # a lookup reads whole row groups: about 1 MiB, at least one row


def sequence_key(input_ids: np.ndarray, positions: Optional[np.ndarray] = None) -> str:
    """One row's key: its token ids, and for a packed row also its positions (where documents start)."""
    digest = hashlib.sha256(np.ascontiguousarray(input_ids, dtype=np.int32).tobytes())
    if positions is not None:
        digest.update(b"positions")
        digest.update(np.ascontiguousarray(positions, dtype=np.int32).tobytes())
    return digest.hexdigest()


def row_keys(input_ids: np.ndarray, positions: Optional[np.ndarray] = None) -> List[str]:
    return [sequence_key(row, None if positions is None else positions[i]) for i, row in enumerate(input_ids)]


def file_sha256(path: Path, memo_dir: Optional[str] = None) -> str:
    """sha256 of every byte of `path`, remembered in `memo_dir` by path, size and modification time:
    a teacher's weights are hashed once, and a changed file is hashed again."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = Path(memo_dir).expanduser() / "file-sha256.json" if memo_dir else None
    known = {}
    if memo is not None and memo.is_file():
        try:
            known = json.loads(memo.read_text())
        except (OSError, json.JSONDecodeError):  # a damaged memo costs one re-hash, nothing else
            known = {}
    stamp = [stat.st_size, stat.st_mtime_ns]
    entry = known.get(str(path))
    if entry and entry["stamp"] == stamp:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    if memo is not None:
        known[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
        memo.parent.mkdir(parents=True, exist_ok=True)
        staging = memo.with_name(f".{memo.name}.{uuid.uuid4().hex[:8]}")
        staging.write_text(json.dumps(known, sort_keys=True))
        os.replace(staging, memo)  # concurrent writers: the last one wins, a lost entry is re-hashed
    return digest.hexdigest()


def teacher_signature(model_dir: Path, settings: dict, memo_dir: Optional[str] = None) -> dict:
    """Who answers (model config and every byte of its weight files) and how (top-k, tau, layer, vocab)."""
    model_dir = Path(model_dir)
    weights = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(path.name.encode() + b"\0" + file_sha256(path, memo_dir).encode())
    identity = {"config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
                "weights_sha256": weights.hexdigest(), **settings}
    identity["signature"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return identity


def signal_settings(t: TeacherConfig, temperature: float, qkv_layer: Optional[int], vocab_size: int) -> dict:
    """What, besides the model, decides a teacher's answers (part of the cache signature)."""
    return {"signal": t.signal, "top_k": t.top_k if t.signal == "topk" else None,
            "draws": t.draws if t.signal == "sampled" else None,
            # hidden states do not depend on tau (the loss applies it), so one cache serves every tau
            "temperature": None if t.signal == "hidden" else float(temperature),
            "qkv_layer": qkv_layer, "vocab_size": vocab_size}


def to_record_batch(keys: List[str], output: TeacherOutput) -> pa.RecordBatch:
    columns = {"key": pa.array(keys, type=pa.string())}
    for name in ROW_FIELDS:
        value = getattr(output, name)
        if value is not None:
            columns[name] = pa.array([row.tobytes() for row in value], type=pa.binary())
    return pa.RecordBatch.from_pydict(columns)


def write_shard(directory: Path, table: pa.Table) -> Path:
    """Atomically: the shard appears complete under its final name or not at all. Row groups of about
    ROW_GROUP_BYTES, so a lookup reads little more than the rows it asked for."""
    final = directory / f"shard-{uuid.uuid4().hex[:16]}.parquet"
    staging = directory / f".{final.name}.tmp"
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    pq.write_table(table, staging, row_group_size=max(1, ROW_GROUP_BYTES // row_bytes))
    os.replace(staging, final)
    return final


def _prefix(key: str) -> int:
    """The index holds the first 8 bytes of a key (16 B per cached row with its location); a lookup
    compares the whole key in the row group it reads, so a prefix collision is a miss, never a wrong row."""
    return int(key[:16], 16)


class KeyIndex:
    """Key prefix -> (shard, row group), for every row of the shards indexed so far: sorted numpy
    arrays, plus a small dict for the rows added since the last merge (write-through appends often)."""

    def __init__(self, merge_every: int = 65_536):
        self.prefixes = np.zeros(0, np.uint64)
        self.locations = np.zeros(0, np.int64)
        self.recent: Dict[int, int] = {}
        self.merge_every = merge_every

    def add(self, prefixes: List[int], location: int) -> None:
        for prefix in prefixes:
            self.recent[prefix] = location
        if len(self.recent) >= self.merge_every:
            self.merge()

    def merge(self) -> None:
        if not self.recent:
            return
        prefixes = np.concatenate([self.prefixes, np.fromiter(self.recent, np.uint64, len(self.recent))])
        locations = np.concatenate([self.locations, np.fromiter(self.recent.values(), np.int64, len(self.recent))])
        # a key stored twice (two replicas answered it) keeps one location; stable sort keeps the first
        order = np.argsort(prefixes, kind="stable")
        prefixes, locations = prefixes[order], locations[order]
        first = np.ones(len(prefixes), bool)
        first[1:] = prefixes[1:] != prefixes[:-1]
        self.prefixes, self.locations, self.recent = prefixes[first], locations[first], {}

    def _merged(self, prefix: int) -> Optional[int]:
        at = int(np.searchsorted(self.prefixes, np.uint64(prefix)))
        return int(self.locations[at]) if at < len(self.prefixes) and self.prefixes[at] == prefix else None

    def find(self, prefix: int) -> Optional[int]:
        return self.recent[prefix] if prefix in self.recent else self._merged(prefix)

    def __len__(self) -> int:
        return len(self.prefixes) + sum(1 for p in self.recent if self._merged(p) is None)


class TeacherCache:
    """Reads and appends answers for one signature, paging: a lookup reads only the row groups that
    hold the requested keys, found through a `KeyIndex` built from the shards' key columns. Decoded
    row groups stay in an LRU of at most `memory_mb`, so a replica's memory follows that setting
    (plus 16 B per cached row of index), not the cache's size."""

    def __init__(self, cache_dir: str, signature: dict, create: bool, flush_rows: int = 256,
                 memory_mb: float = 512):
        self.directory = Path(cache_dir).expanduser() / signature["signature"]
        self.signature = signature
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "signature.json").write_text(json.dumps(signature, indent=2, sort_keys=True))
        elif not (self.directory / "signature.json").is_file():
            raise DistillError(f"no teacher cache for this teacher and signal at {self.directory}; run "
                               f"ray_jobs/precompute_teacher.py with the same teacher and distillation settings, "
                               f"or set teacher.write_through=true")
        self.shards: List[Path] = []
        self.index = KeyIndex()
        self.groups: "OrderedDict[int, tuple]" = OrderedDict()  # location -> (rows by key, bytes), LRU order
        self.memory_bytes, self.budget_bytes = 0, int(memory_mb * (1 << 20))
        self.pending: List[pa.RecordBatch] = []
        self.pending_rows: Dict[str, Dict[str, bytes]] = {}
        self.flush_rows = flush_rows
        self.indexed = False  # built on first use: opening a cache to check it exists reads nothing

    def reload(self) -> None:
        """Index the shards written since the last call (by this or any other process)."""
        known = {path.name for path in self.shards}
        for path in sorted(self.directory.glob("*.parquet")):
            if path.name not in known:
                self._index_shard(path)
        self.index.merge()
        self.indexed = True

    def _index_shard(self, path: Path) -> None:
        shard = len(self.shards)
        self.shards.append(path)
        file = pq.ParquetFile(path)
        keys = file.read(columns=["key"]).column("key").to_pylist()  # one read per shard, key column only
        start = 0
        for group in range(file.num_row_groups):
            end = start + file.metadata.row_group(group).num_rows
            self.index.add([_prefix(k) for k in keys[start:end]], shard << 20 | group)
            start = end

    def _ensure_indexed(self) -> None:
        if not self.indexed:
            self.reload()

    def _group(self, location: int) -> Dict[str, Dict[str, bytes]]:
        """The rows of one row group, {key: {field: bytes}}, through the LRU."""
        if location in self.groups:
            self.groups.move_to_end(location)
            return self.groups[location][0]
        table = pq.ParquetFile(self.shards[location >> 20]).read_row_group(location & 0xFFFFF)
        rows = _rows_by_key(table)
        self.groups[location] = (rows, table.nbytes)
        self.memory_bytes += table.nbytes
        while self.memory_bytes > self.budget_bytes and len(self.groups) > 1:
            _, (_, evicted_bytes) = self.groups.popitem(last=False)
            self.memory_bytes -= evicted_bytes
        return rows

    def _row(self, key: str) -> Optional[Dict[str, bytes]]:
        if key in self.pending_rows:
            return self.pending_rows[key]
        location = self.index.find(_prefix(key))
        return None if location is None else self._group(location).get(key)

    def has(self, key: str) -> bool:
        self._ensure_indexed()
        return key in self.pending_rows or self.index.find(_prefix(key)) is not None

    def __len__(self) -> int:
        self._ensure_indexed()
        return len(self.index) + len(self.pending_rows)

    def lookup(self, input_ids: np.ndarray, positions: Optional[np.ndarray] = None) -> tuple:
        """(TeacherOutput of the found rows or None, indices of the missing rows)."""
        self._ensure_indexed()
        keys = row_keys(input_ids, positions)
        found = [self._row(key) for key in keys]
        missing = [i for i, row in enumerate(found) if row is None]
        if missing:
            return None, missing
        rows = [row for row in found if row is not None]  # all of them: none is missing
        batch, length = input_ids.shape
        arrays = {}
        for name in rows[0]:
            stacked = np.stack([np.frombuffer(row[name], dtype=DTYPES[name]) for row in rows])
            arrays[name] = stacked.reshape(batch, length, -1) if name != "tail_mass" else stacked.reshape(batch, length)
        tau = self.signature["temperature"]  # None for hidden states (the loss applies tau)
        temperature = None if tau is None else np.full(batch, tau, dtype=np.float32)
        return TeacherOutput(temperature=temperature, **arrays), []

    def add(self, input_ids: np.ndarray, output: TeacherOutput, positions: Optional[np.ndarray] = None) -> None:
        """Remember new answers now; write them as one shard per `flush_rows` rows (and on flush)."""
        self._ensure_indexed()
        keys = row_keys(input_ids, positions)
        batch = to_record_batch(keys, output)
        self.pending.append(batch)
        self.pending_rows.update(_rows_by_key(batch))
        if len(self.pending_rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            path = write_shard(self.directory, pa.Table.from_batches(self.pending))
            self._index_shard(path)
            self.pending, self.pending_rows = [], {}


def _rows_by_key(table) -> Dict[str, Dict[str, bytes]]:
    """A table's (or record batch's) rows: {key: {field: bytes}}."""
    columns = {name: table.column(name).to_pylist() for name in table.schema.names}
    keys = columns.pop("key")
    return {key: {name: values[i] for name, values in columns.items()} for i, key in enumerate(keys)}
