"""Teacher answers on disk: Parquet shards keyed by content hash, under a signature of who answered.

Layout: `<cache_dir>/<signature>/signature.json` (the teacher identity and signal settings the
signature hashes) and `*.parquet` shards with a `key` column (sha256 of the token ids) and one
binary column per `TeacherOutput` field holding that row's array. Answers from another teacher, or
the same teacher with another top-k, temperature, layer or vocabulary, live under another signature,
so a cache can never replay targets that do not match the run.
"""

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distillation.errors import DistillError
from distillation.teachers.schema import DTYPES, TeacherOutput

ROW_FIELDS = tuple(name for name in DTYPES if name != "temperature")  # temperature is in the signature


def sequence_key(input_ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(input_ids, dtype=np.int32).tobytes()).hexdigest()


def teacher_signature(model_dir: Path, settings: dict) -> dict:
    """Who answers (model config and weight files, by content) and how (top-k, tau, layer, vocab)."""
    model_dir = Path(model_dir)
    weights = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(path.name.encode() + str(path.stat().st_size).encode())
        with open(path, "rb") as handle:  # the header names every tensor and its shape and offset
            weights.update(handle.read(1 << 20))
    identity = {"config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
                "weights_sha256": weights.hexdigest(), **settings}
    identity["signature"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return identity


def signal_settings(cfg, qkv_layer: Optional[int], vocab_size: int) -> dict:
    """What, besides the model, decides a teacher's answers (part of the cache signature)."""
    t = cfg.teacher
    return {"signal": t.signal, "top_k": t.top_k if t.signal == "topk" else None,
            "draws": t.draws if t.signal == "sampled" else None,
            # hidden states do not depend on tau (the loss applies it), so one cache serves every tau
            "temperature": None if t.signal == "hidden" else float(cfg.distillation.temperature),
            "qkv_layer": qkv_layer, "vocab_size": vocab_size}


def to_record_batch(keys: List[str], output: TeacherOutput) -> pa.RecordBatch:
    columns = {"key": pa.array(keys, type=pa.string())}
    for name in ROW_FIELDS:
        value = getattr(output, name)
        if value is not None:
            columns[name] = pa.array([row.tobytes() for row in value], type=pa.binary())
    return pa.RecordBatch.from_pydict(columns)


def write_shard(directory: Path, table: pa.Table) -> Path:
    """Atomically: the shard appears complete under its final name or not at all."""
    final = directory / f"shard-{uuid.uuid4().hex[:16]}.parquet"
    staging = directory / f".{final.name}.tmp"
    pq.write_table(table, staging)
    os.replace(staging, final)
    return final


class TeacherCache:
    """Reads and appends answers for one signature. Rows are fetched by key from shards loaded once."""

    def __init__(self, cache_dir: str, signature: dict, create: bool, flush_rows: int = 256):
        self.directory = Path(cache_dir).expanduser() / signature["signature"]
        self.signature = signature
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "signature.json").write_text(json.dumps(signature, indent=2, sort_keys=True))
        elif not (self.directory / "signature.json").is_file():
            raise DistillError(f"no teacher cache for this teacher and signal at {self.directory}; run "
                               f"ray_jobs/precompute_teacher.py with the same teacher and distillation settings, "
                               f"or set teacher.write_through=true")
        self.rows: Dict[str, Dict[str, bytes]] = {}
        self.pending: List[pa.RecordBatch] = []
        self.flush_rows = flush_rows
        self.reload()

    def reload(self) -> None:
        for path in sorted(self.directory.glob("*.parquet")):
            self._remember(pq.read_table(path))

    def _remember(self, table) -> None:
        """Index a table's (or record batch's) rows by key: {key: {field: bytes}}."""
        columns = {name: table.column(name).to_pylist() for name in table.schema.names}
        keys = columns.pop("key")
        for i, key in enumerate(keys):
            self.rows[key] = {name: values[i] for name, values in columns.items()}

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, input_ids: np.ndarray) -> tuple:
        """(TeacherOutput of the found rows or None, indices of the missing rows)."""
        keys = [sequence_key(row) for row in input_ids]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        if missing:
            return None, missing
        batch, length = input_ids.shape
        arrays = {}
        for name in self.rows[keys[0]]:
            stacked = np.stack([np.frombuffer(self.rows[key][name], dtype=DTYPES[name]) for key in keys])
            arrays[name] = stacked.reshape(batch, length, -1) if name != "tail_mass" else stacked.reshape(batch, length)
        tau = self.signature["temperature"]  # None for hidden states (the loss applies tau)
        temperature = None if tau is None else np.full(batch, tau, dtype=np.float32)
        return TeacherOutput(temperature=temperature, **arrays), []

    def add(self, input_ids: np.ndarray, output: TeacherOutput) -> None:
        """Remember new answers now; write them as one shard per `flush_rows` rows (and on flush)."""
        keys = [sequence_key(row) for row in input_ids]
        batch = to_record_batch(keys, output)
        self.pending.append(batch)
        self._remember(batch)
        if sum(b.num_rows for b in self.pending) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            table = pa.Table.from_batches(self.pending)
            write_shard(self.directory, table)
            self.pending = []
