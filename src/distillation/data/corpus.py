"""The run's data: the opened sources (whose training rows the mixture reads unit by unit, as the run
consumes them), held-out rows for evaluation (with the byte count bits/byte needs), the probe rows
influence scores against, and a small pool of training rows per source for influence estimates.

Only those small sets are read before training: each source's first units in canonical order, until
they hold enough held-out, probe and pool rows. So the time to the first step and the driver's memory
do not grow with the corpus.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from distillation.config.schema import DataConfig, InfluenceConfig, SourceConfig
from distillation.data.mixture import validate_weights
from distillation.data.packing import Packed, concat, predicted_bytes
from distillation.data.rows import SPLITS, RowRecipe
from distillation.data.sources import Fields, SourceSpec, Unit, open_source
from distillation.errors import DistillError, get_or_raise
from distillation.models import ModelSource

# Starts reading one unit (on a unit reader, roles/unit_reader.py) and returns its ref
Cut = Callable[[RowRecipe, SourceSpec, Unit], Any]

SCAN_WINDOW = 4  # units read at once while sampling the small sets
SCAN_UNITS = 64  # at most this many units per source are read for them (a bound on the time to the first step)


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
    return packed.take(np.linspace(0, len(packed.rows) - 1, count).round().astype(int))


def fill_ratio(parts: List[Packed]) -> float:
    """Real tokens per row position (one document per row pads the rest)."""
    return sum(int(p.lengths.sum()) for p in parts) / max(1, sum(p.rows.size for p in parts))


def open_sources(d: DataConfig, labels: Sequence[str] = ()) -> Dict[str, SourceSpec]:
    """Every source opened and checked (paths, formats, fields, weights) in the driver, from metadata,
    before anything starts. `labels`: a classification task's, which every record's answer must be."""
    validate_weights([s.weight for s in d.sources], [s.name for s in d.sources])
    return {s.name: open_source(s.name, s.kind, s.path, d.cache_dir, split=s.split, max_tokens=d.max_tokens_per_source,
                                fields=source_fields(s, labels)) for s in d.sources}


def source_fields(s: SourceConfig, labels: Sequence[str] = ()) -> Fields:
    return Fields(s.format, s.text_field, s.messages_field, s.prompt_field, s.response_field, s.prompt_template,
                  tuple(labels) if s.format != "text" else ())


def row_recipe(d: DataConfig, tokenizer: ModelSource) -> RowRecipe:
    return RowRecipe(tokenizer, d.seq_len, d.heldout_fraction, d.probe_fraction, d.pack_documents,
                     records=any(s.format != "text" for s in d.sources), chat_template=d.chat_template)


def _sample(spec: SourceSpec, recipe: RowRecipe, wanted: Dict[str, int], cut: Cut) -> Dict[str, Packed]:
    """The rows of the source's first units (canonical order) until each split has `wanted` rows,
    read SCAN_WINDOW units at a time; which units are read does not depend on timing."""
    got: Dict[str, List[Packed]] = {name: [] for name in SPLITS}
    pending: List[Any] = []  # the readers' ObjectRefs, oldest first
    next_unit, last = 0, min(len(spec.units), SCAN_UNITS)
    while True:
        enough = all(sum(len(p.rows) for p in got[name]) >= n for name, n in wanted.items())
        if enough or (not pending and next_unit == last):
            break
        while len(pending) < SCAN_WINDOW and next_unit < last:
            pending.append(cut(recipe, spec, spec.units[next_unit]))
            next_unit += 1
        for name, packed in get_or_raise(pending.pop(0)).items():
            got[name].append(packed)
    for ref in pending:  # reads already started: a bad record in them stops the run here, not in training
        get_or_raise(ref)
    return {name: concat(parts, recipe.seq_len) for name, parts in got.items()}


def prepare_corpus(d: DataConfig, inf: InfluenceConfig, tokenizer_model: ModelSource, tokenizer,
                   specs: Dict[str, SourceSpec], cut: Cut) -> Corpus:
    """The small sets, read through `cut` (the caller owns the readers)."""
    recipe = row_recipe(d, tokenizer_model)
    probe_source = inf.probe_source or d.sources[0].name
    heldout, pool, probe, train_read = {}, {}, None, []
    sampled = {name: _sample(spec, recipe, {
        "train": inf.pool_sequences if inf.enabled else 1,
        "heldout": 4 * d.heldout_sequences if d.heldout_fraction > 0 else 0,
        "probe": 2 * inf.probe_sequences if inf.enabled and name == probe_source else 0}, cut)
        for name, spec in specs.items()}
    for name, rows in sampled.items():
        if len(rows["train"].rows) == 0:
            raise DistillError(f"source '{name}' yields no training row in its first {SCAN_UNITS} units "
                               f"(documents need at least 2 tokens)")
        train_read.append(rows["train"])
        pool[name] = spread(rows["train"], inf.pool_sequences)
        heldout[name] = spread(rows["heldout"], d.heldout_sequences)
        if name == probe_source:
            probe = spread(rows["probe"], inf.probe_sequences)
    assert probe is not None  # influence.probe_source is one of data.sources (config/loader.py), all in `specs`
    if inf.enabled and len(probe.rows) == 0:
        raise DistillError(f"influence probe source '{probe_source}' has no probe documents in its first "
                           f"{SCAN_UNITS} units; raise data.probe_fraction")
    all_heldout = concat(list(heldout.values()), d.seq_len)
    return Corpus(specs, recipe, heldout, all_heldout, predicted_bytes(all_heldout, tokenizer), probe, pool,
                  fill_ratio(train_read))
