"""Where a run's checkpoints and final student live: `run.storage_path` (a folder every node can
reach, or a URI such as s3://, gs:// or file://, read through pyarrow's filesystems as Ray Train does),
or by default the run folder itself. Small outputs (metrics, ledger, plots, summary) are always
written to the local run folder, and copied to the storage when it is elsewhere."""

from pathlib import Path
from typing import Optional, Tuple

from distillation.errors import DistillError

TRAIN_DIR = "train"


def check_writable(folder: Path, what: str) -> None:
    """A DistillError unless a new entry can be made in `folder`: a real attempt, undone at once
    (permission bits alone miss read-only and virtual file systems such as /proc)."""
    import os
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".distill-probe-", dir=folder))
    except OSError as exc:
        raise DistillError(f"cannot create {what}: {folder} is not writable ({exc.strerror})") from None


def join(base: str, *parts: str) -> str:
    """`base`/`parts`, keeping a URI's query (s3://bucket/runs?region=eu-west-1) at the end."""
    base, mark, query = base.partition("?") if "://" in base else (base, "", "")
    return "/".join([base.rstrip("/"), *parts]) + mark + query


def train_storage(storage_path: Optional[str], run_dir: Path) -> Tuple[str, str]:
    """(storage_path, name) for Ray Train's RunConfig from `run.storage_path`: the same on a resumed
    driver, so Ray Train finds the run's latest checkpoint there."""
    if storage_path:
        return join(normalised(storage_path), run_dir.name), TRAIN_DIR
    return str(run_dir / "ray"), TRAIN_DIR


def train_location(storage_path: Optional[str], run_dir: Path) -> str:
    return join(*train_storage(storage_path, run_dir))


def run_storage(storage_path: Optional[str], run_dir: Path) -> Optional[str]:
    """The run's folder on `run.storage_path` when it is not the local run folder, else None."""
    return join(normalised(storage_path), run_dir.name) if storage_path else None


def normalised(path: str) -> str:
    """A URI as given; a plain path made absolute (Ray Train refuses relative paths)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _filesystem(location: str):
    """(pyarrow filesystem, path) for a URI or a local path; a bad scheme or missing credentials is
    a one-line error."""
    import pyarrow.fs as pafs

    if "://" not in location:
        return pafs.LocalFileSystem(), location
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for schemes, buckets, credentials
        raise DistillError(f"cannot open storage '{location}' (run.storage_path): {str(exc).splitlines()[0]}") from None


def check_storage(storage_path: str) -> None:
    """`run.storage_path` can hold a run: a local folder (or file:// URI) whose nearest existing
    ancestor takes a new entry, or a remote URI that takes a small file; tried for real and undone,
    before the run starts (creating nothing that stays)."""
    import uuid

    location = normalised(storage_path)
    what = f"the run's storage (run.storage_path={storage_path})"
    if "://" not in location or location.startswith("file://"):
        folder = Path(location[len("file://"):] if location.startswith("file://") else location).expanduser()
        check_writable(next(p for p in [folder, *folder.parents] if p.exists()), what)
        return
    fs, path = _filesystem(location)
    probe = f"{path.rstrip('/')}/.distill-probe-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    except Exception as exc:  # pyarrow's error types differ per filesystem
        raise DistillError(f"cannot create {what}: {str(exc).splitlines()[0]}") from None


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def subfolders(location: str) -> list:
    """Names of the folders directly under `location` (none if it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path))
                  if info.type == pafs.FileType.Directory)


def remove_folder(location: str) -> None:
    fs, path = _filesystem(location)
    fs.delete_dir(path)


def upload(local_dir: Path, location: str, skip: Tuple[str, ...] = ()) -> None:
    """Copy `local_dir`'s files (not the names in `skip`) under `location`."""
    import pyarrow.fs as pafs

    fs, base = _filesystem(location)
    for path in sorted(Path(local_dir).rglob("*")):
        rel = path.relative_to(local_dir)
        if path.is_dir() or rel.parts[0] in skip or path.is_symlink():
            continue
        fs.create_dir(join(base, *rel.parent.parts) if rel.parent.parts else base, recursive=True)
        pafs.copy_files(str(path), join(base, *rel.parts), destination_filesystem=fs)


def read_text(location: str) -> Optional[str]:
    """A small file's text, or None if it is not there."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(location: str, text: str) -> None:
    fs, path = _filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())
