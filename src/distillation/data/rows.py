"""How a unit of a source becomes rows: the recipe every unit reader (roles/unit_reader.py) and the
precompute stages cut with."""

from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from distillation.data.packing import Packed, pack, pack_documents
from distillation.data.sources import SourceSpec, Unit, read_unit, split_of
from distillation.models import ModelSource

SPLITS = ("train", "heldout", "probe")
_TOKENIZERS: dict = {}  # per worker process: a tokenizer is loaded once and kept for later tasks


@dataclass(frozen=True)
class RowRecipe:
    """How a unit becomes rows: tokenized, each document assigned its split, cut into rows. Training
    rows are packed (several documents per row) when `pack_documents`; held-out and probe rows are
    always one document per row, so bits/byte is comparable between packed and unpacked runs."""
    tokenizer: ModelSource  # resolved on the reader's node
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
