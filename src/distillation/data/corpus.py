"""The run's text, split and cut into rows: training rows per source, held-out rows for evaluation
(with the byte count bits/byte needs) and the probe rows influence scores against."""

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from omegaconf import DictConfig

from distillation.data.packing import Packed, pack, predicted_bytes
from distillation.data.pipeline import tokenize_documents
from distillation.data.sources import Document, content_digest, load_documents, split_of
from distillation.errors import DistillError


@dataclass
class Corpus:
    train: Dict[str, Packed]  # per source
    heldout_by_source: Dict[str, Packed]
    heldout: Packed  # every source's held-out rows together
    heldout_bytes: int  # UTF-8 bytes of the held-out tokens that are predicted
    probe: Packed  # the influence target set (probe documents of influence.probe_source)
    digests: Dict[str, str]  # sha256 of each source's documents

    def fill_ratio(self) -> float:
        """Real tokens per row position over the training rows (one document per row pads the rest)."""
        rows = [p for p in self.train.values() if len(p.rows)]
        return sum(int(p.lengths.sum()) for p in rows) / max(1, sum(p.rows.size for p in rows))


def spread(packed: Packed, count: int) -> Packed:
    """`count` rows picked evenly across `packed` (all of them if there are fewer): the first piece
    of a document can be unrepresentative (a licence header, say)."""
    if len(packed.rows) <= count:
        return packed
    index = np.linspace(0, len(packed.rows) - 1, count).round().astype(int)
    return Packed(packed.rows[index], packed.lengths[index], packed.dropped_tokens)


def concat(parts: List[Packed]) -> Packed:
    return Packed(np.concatenate([p.rows for p in parts]), np.concatenate([p.lengths for p in parts]),
                  sum(p.dropped_tokens for p in parts))


def load_sources(cfg: DictConfig) -> Dict[str, List[Document]]:
    """Every source's documents, read and checked (paths, formats, fields, weights) in the driver,
    before anything starts."""
    from distillation.data.mixture import validate_weights

    d = cfg.data
    validate_weights([s.weight for s in d.sources], [s.name for s in d.sources])
    return {s.name: load_documents(s.name, s.kind, s.path, d.cache_dir, d.max_tokens_per_source, s.text_field, s.split)
            for s in d.sources}


def prepare_corpus(cfg: DictConfig, tokenizer_dir: str, tokenizer,
                   documents: Optional[Dict[str, List[Document]]] = None) -> Corpus:
    """Tokenized (Ray Data), split and cut into rows; `documents` from `load_sources` if already read."""
    d = cfg.data
    documents = documents if documents is not None else load_sources(cfg)
    docs, digests = [], {}
    for source in d.sources:
        loaded = documents[source.name]
        digests[source.name] = content_digest(loaded)
        docs.extend(loaded)
    tokens = tokenize_documents(docs, tokenizer_dir)  # per source, in document order
    probe_source = cfg.influence.probe_source or d.sources[0].name
    train, heldout, probe = {}, {}, None
    for source in d.sources:
        by_split = {"train": [], "heldout": [], "probe": []}
        mine = [doc for doc in docs if doc.source == source.name]
        for doc, toks in zip(mine, tokens.get(source.name, [])):
            by_split[split_of(f"{source.name}/{doc.doc_id}", d.heldout_fraction, d.probe_fraction)].append(toks)
        rows = {name: pack(part, tokenizer.eos_token_id, d.seq_len, d.max_tokens_per_source)
                for name, part in by_split.items()}
        if len(rows["train"].rows) == 0:
            raise DistillError(f"source '{source.name}' yields no training row (documents need at least 2 tokens)")
        train[source.name] = rows["train"]
        heldout[source.name] = spread(rows["heldout"], d.heldout_sequences)
        if source.name == probe_source:
            probe = spread(rows["probe"], cfg.influence.probe_sequences)
    if cfg.influence.enabled and len(probe.rows) == 0:
        raise DistillError(f"influence probe source '{probe_source}' has no probe documents; raise data.probe_fraction")
    all_heldout = concat(list(heldout.values()))
    return Corpus(train, heldout, all_heldout, predicted_bytes(all_heldout, tokenizer), probe, digests)
