"""The run's data: the opened sources (whose training rows the mixture reads unit by unit, as the run
consumes them), held-out rows for evaluation (with the byte count bits/byte needs), the probe rows
influence scores against, and a small pool of training rows per source for influence estimates.

Only those small sets are read before training: each source's first units in canonical order, until
they hold enough held-out, probe and pool rows. So the time to the first step and the driver's memory
do not grow with the corpus.
"""

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np
import ray
from omegaconf import DictConfig

from distillation.data.packing import Packed, pack, pack_documents, predicted_bytes
from distillation.data.sources import SourceSpec, Unit, open_source, read_unit, split_of
from distillation.errors import DistillError, get_or_raise

if TYPE_CHECKING:  # models imports torch, which the driver's data planning does not need
    from distillation.models import ModelSource

SPLITS = ("train", "heldout", "probe")
SCAN_WINDOW = 4  # units read at once while sampling the small sets
SCAN_UNITS = 64  # at most this many units per source are read for them (a bound on the time to the first step)
_TOKENIZERS: dict = {}  # per worker process: a tokenizer is loaded once and kept for later tasks


@dataclass(frozen=True)
class RowRecipe:
    """How a unit becomes rows: tokenized, each document assigned its split, cut into rows. Training
    rows are packed (several documents per row) when `pack_documents`; held-out and probe rows are
    always one document per row, so bits/byte is comparable between packed and unpacked runs."""
    tokenizer: "ModelSource"  # resolved on the reader's node
    seq_len: int
    heldout_fraction: float
    probe_fraction: float
    pack_documents: bool = False

    def cut(self, spec: SourceSpec, unit: Unit) -> Dict[str, Packed]:
        from distillation.models import load_tokenizer, local_dir

        if self.tokenizer not in _TOKENIZERS:
            _TOKENIZERS[self.tokenizer] = load_tokenizer(local_dir(self.tokenizer, weights=False))
        tokenizer = _TOKENIZERS[self.tokenizer]
        docs = read_unit(spec, unit)
        encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"] if docs else []
        parts: Dict[str, List[np.ndarray]] = {name: [] for name in SPLITS}
        for doc, ids in zip(docs, encoded):
            split = split_of(f"{spec.name}/{doc.doc_id}", self.heldout_fraction, self.probe_fraction)
            parts[split].append(np.asarray(ids, dtype=np.int32))
        rows = {name: pack(tokens, tokenizer.eos_token_id, self.seq_len) for name, tokens in parts.items()
                if name != "train" or not self.pack_documents}
        if self.pack_documents:
            rows["train"] = pack_documents(parts["train"], tokenizer.eos_token_id, self.seq_len)
        return rows


@ray.remote
class UnitReader:
    """Reads and cuts units on a Ray worker. An actor, not a task per unit: each task with no CPU
    booked may start a worker process of its own (importing transformers, loading the tokenizer),
    which on a small machine cost more than the reading."""

    def cut(self, recipe: RowRecipe, spec: SourceSpec, unit: Unit) -> Dict[str, Packed]:
        return recipe.cut(spec, unit)


class Readers:
    """`count` UnitReader actors that units are sent to in turn (owned by whoever creates them, so
    they end with it)."""

    def __init__(self, count: int, num_cpus: float):
        self.actors = [UnitReader.options(num_cpus=num_cpus).remote() for _ in range(count)]
        self.sent = 0

    def cut(self, recipe: RowRecipe, spec: SourceSpec, unit: Unit) -> "ray.ObjectRef":
        """The unit's rows, later; `spec` travels without its unit list (which can be long)."""
        actor = self.actors[self.sent % len(self.actors)]
        self.sent += 1
        return actor.cut.remote(recipe, replace(spec, units=()), unit)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


@dataclass
class Corpus:
    specs: Dict[str, SourceSpec]
    recipe: RowRecipe
    heldout_by_source: Dict[str, Packed]
    heldout: Packed  # every source's held-out rows together
    heldout_bytes: int  # UTF-8 bytes of the held-out tokens that are predicted
    probe: Packed  # the influence target set (probe documents of influence.probe_source)
    pool: Dict[str, Packed]  # training rows per source that influence estimates draw from
    fill: float  # real tokens per row position over the training rows read so far

    def fingerprints(self) -> Dict[str, str]:
        return {name: spec.fingerprint for name, spec in self.specs.items()}


def spread(packed: Packed, count: int) -> Packed:
    """`count` rows picked evenly across `packed` (all of them if there are fewer): the first piece
    of a document can be unrepresentative (a licence header, say)."""
    if len(packed.rows) <= count:
        return packed
    index = np.linspace(0, len(packed.rows) - 1, count).round().astype(int)
    return Packed(packed.rows[index], packed.lengths[index], packed.dropped_tokens,
                  None if packed.positions is None else packed.positions[index])


def concat(parts: List[Packed], seq_len: int) -> Packed:
    parts = [p for p in parts if len(p.rows)]
    if not parts:
        return Packed(np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32), 0)
    return Packed(np.concatenate([p.rows for p in parts]), np.concatenate([p.lengths for p in parts]),
                  sum(p.dropped_tokens for p in parts),
                  None if parts[0].positions is None else np.concatenate([p.positions for p in parts]))


def fill_ratio(parts: List[Packed]) -> float:
    """Real tokens per row position (one document per row pads the rest)."""
    return sum(int(p.lengths.sum()) for p in parts) / max(1, sum(p.rows.size for p in parts))


def open_sources(cfg: DictConfig) -> Dict[str, SourceSpec]:
    """Every source opened and checked (paths, formats, fields, weights) in the driver, from metadata,
    before anything starts."""
    from distillation.data.mixture import validate_weights

    d = cfg.data
    validate_weights([s.weight for s in d.sources], [s.name for s in d.sources])
    return {s.name: open_source(s.name, s.kind, s.path, d.cache_dir, s.text_field, s.split, d.max_tokens_per_source)
            for s in d.sources}


def row_recipe(cfg: DictConfig, tokenizer: "ModelSource") -> RowRecipe:
    d = cfg.data
    return RowRecipe(tokenizer, d.seq_len, d.heldout_fraction, d.probe_fraction, d.pack_documents)


def _sample(spec: SourceSpec, recipe: RowRecipe, wanted: Dict[str, int], readers: Readers) -> Dict[str, Packed]:
    """The rows of the source's first units (canonical order) until each split has `wanted` rows,
    read SCAN_WINDOW units at a time; which units are read does not depend on timing."""
    got: Dict[str, List[Packed]] = {name: [] for name in SPLITS}
    pending, next_unit, last = [], 0, min(len(spec.units), SCAN_UNITS)
    while True:
        enough = all(sum(len(p.rows) for p in got[name]) >= n for name, n in wanted.items())
        if enough or (not pending and next_unit == last):
            break
        while len(pending) < SCAN_WINDOW and next_unit < last:
            pending.append(readers.cut(recipe, spec, spec.units[next_unit]))
            next_unit += 1
        for name, packed in get_or_raise(pending.pop(0)).items():
            got[name].append(packed)
    for ref in pending:  # reads already started: a bad record in them stops the run here, not in training
        get_or_raise(ref)
    return {name: concat(parts, recipe.seq_len) for name, parts in got.items()}


def prepare_corpus(cfg: DictConfig, tokenizer_model: "ModelSource", tokenizer,
                   specs: Optional[Dict[str, SourceSpec]] = None) -> Corpus:
    d, inf = cfg.data, cfg.influence
    specs = specs if specs is not None else open_sources(cfg)
    recipe = row_recipe(cfg, tokenizer_model)
    probe_source = inf.probe_source or d.sources[0].name
    heldout, pool, probe, train_read = {}, {}, None, []
    readers = Readers(d.readers, d.reader_cpus)
    try:
        sampled = {name: _sample(spec, recipe, {
            "train": inf.pool_sequences if inf.enabled else 1,
            "heldout": 4 * d.heldout_sequences if d.heldout_fraction > 0 else 0,
            "probe": 2 * inf.probe_sequences if inf.enabled and name == probe_source else 0}, readers)
            for name, spec in specs.items()}
    finally:
        readers.close()
    for name, rows in sampled.items():
        if len(rows["train"].rows) == 0:
            raise DistillError(f"source '{name}' yields no training row in its first {SCAN_UNITS} units "
                               f"(documents need at least 2 tokens)")
        train_read.append(rows["train"])
        pool[name] = spread(rows["train"], inf.pool_sequences)
        heldout[name] = spread(rows["heldout"], d.heldout_sequences)
        if name == probe_source:
            probe = spread(rows["probe"], inf.probe_sequences)
    if inf.enabled and len(probe.rows) == 0:
        raise DistillError(f"influence probe source '{probe_source}' has no probe documents in its first "
                           f"{SCAN_UNITS} units; raise data.probe_fraction")
    all_heldout = concat(list(heldout.values()), d.seq_len)
    return Corpus(specs, recipe, heldout, all_heldout, predicted_bytes(all_heldout, tokenizer), probe, pool,
                  fill_ratio(train_read))
