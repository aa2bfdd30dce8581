"""How a unit of a source becomes rows: the recipe every unit reader (roles/unit_reader.py) and the
precompute stages cut with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from distillation.data.packing import Packed, pack, pack_documents
from distillation.data.records import render, uses_chat_template
from distillation.data.sources import Document, SourceSpec, Unit, read_unit, split_of
from distillation.errors import DistillError

if TYPE_CHECKING:  # the mixture actor holds a recipe without loading torch; readers import it to cut
    from distillation.models import ModelSource

SPLITS = ("train", "heldout", "probe")


@dataclass(frozen=True)
class RowRecipe:
    """How a unit becomes rows: tokenized (EOS ending each document; records rendered with their
    responses labelled, data/records.py), each document assigned its split, cut into rows. Training
    rows are packed (several documents per row) when `pack_documents`; held-out and probe rows are
    always one document per row, so bits/byte is comparable between packed and unpacked runs.
    `records`: some source holds records, so every row carries `labelled`."""
    tokenizer: ModelSource  # resolved on the reader's node
    seq_len: int
    heldout_fraction: float
    probe_fraction: float
    pack_documents: bool = False
    records: bool = False
    chat_template: str = "auto"  # data.chat_template

    def cut(self, spec: SourceSpec, unit: Unit) -> Dict[str, Packed]:
        from distillation.models import cached_tokenizer

        tokenizer = cached_tokenizer(self.tokenizer)
        docs = read_unit(spec, unit)
        parts: Dict[str, List[np.ndarray]] = {name: [] for name in SPLITS}
        masks: Dict[str, List[Optional[np.ndarray]]] = {name: [] for name in SPLITS}
        for doc, (ids, labelled) in zip(docs, self.tokenize(tokenizer, spec, docs)):
            split = split_of(f"{spec.name}/{doc.doc_id}", self.heldout_fraction, self.probe_fraction)
            parts[split].append(ids)
            masks[split].append(labelled)
        eos = tokenizer.eos_token_id
        rows = {name: pack(tokens, eos, self.seq_len, masks=masks[name] if self.records else None)
                for name, tokens in parts.items() if name != "train" or not self.pack_documents}
        if self.pack_documents:
            rows["train"] = pack_documents(parts["train"], eos, self.seq_len, masks["train"] if self.records else None)
        return rows

    def tokenize(self, tokenizer, spec: SourceSpec, docs: List[Document]) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """(ids, labelled) per document: a text's ids with EOS after its last piece (labelled None:
        all of it), or a record rendered, refused when it cannot fit in a row."""
        texts = [d.text for d in docs if d.turns is None]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        chat = any(d.turns is not None for d in docs) and uses_chat_template(tokenizer, self.chat_template)
        out: List[Tuple[np.ndarray, Optional[np.ndarray]]] = []
        for doc in docs:
            if doc.turns is None:
                ids = next(encoded) + ([tokenizer.eos_token_id] if doc.ends else [])
                out.append((np.asarray(ids, dtype=np.int32), None))
                continue
            ids, labelled = render(tokenizer, doc.turns, chat)
            if len(ids) > self.seq_len:
                raise DistillError(f"source '{spec.name}', record {doc.doc_id}: {len(ids)} tokens once rendered, more "
                                   f"than a row holds (data.seq_len={self.seq_len}); raise data.seq_len or shorten it")
            out.append((ids, labelled))
        return out
