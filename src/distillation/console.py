"""What the command line prints: its own `[distill]` lines, and Ray's logs kept out of the way.

By default Ray's own output stays in files: workers' stdout/stderr in the Ray session's log folder
(the run folder links it as `ray_logs`), and what Ray prints from inside this process (its Python
loggers, and its C++ core worker, which writes straight to file descriptor 2) in the run folder's
`driver.log`. `run.verbose=true` streams all of it to the terminal as Ray normally does. Python
warnings and every line of ours still show.
"""

import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

RAY_LOGGERS = ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune")
# Lines Ray writes to this process's stderr: glog lines of its C++ core ("[2026-12-01 22:43:11,291 E 24491
# 24491] core_worker.cc:..."), its Python loggers ("2026-12-01 22:42:46,795	WARNING x.py:85 -- ..."), and
# the log monitor's "(RayTrainWorker pid=...)" lines.
# Its core's E and F lines are shown, except one it prints for every Ray Data actor pool (ray#53727).
# The log monitor's lines ("(raylet) WARNING: N PYTHON worker processes ...") can arrive glued to a
# progress bar's partial line: RAY_GLUED finds where one starts inside a line.
MONITOR = rb"\x1b\[\d+m\(\w+ pid=|\(\w+ pid=\d+|(\x1b\[\d+m)?\(raylet\)"  # the log monitor's prefixes
RAY_GLUED = re.compile(MONITOR)
RAY_LINE = re.compile(rb"^(\[\d{4}-\d\d-\d\d [\d:,.]+ ([DIW] \d+ \d+\]|E \d+ \d+\] core_worker\.cc:\d+: Actor with class "
                      rb"name: .* has constructor arguments in the object store)"
                      rb"|\d{4}-\d\d-\d\d [\d:,.]+\s+(DEBUG|INFO|WARNING)\s|" + MONITOR + rb")")


def say(message: str) -> None:
    print(f"[distill] {message}", flush=True)


def quiet_ray(verbose: bool) -> None:
    """Before `ray.init`: Ray's driver-side loggers and transformers' progress bars off unless verbose."""
    if verbose:
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars each time a model loads


def session_log_dir() -> str:
    """The Ray session's log folder (where every worker's output goes), or '' if unknown."""
    try:
        import ray

        return os.path.join(ray._private.worker.global_worker.node.get_session_dir_path(), "logs")
    except Exception:  # a client connection or a Ray without this internal: the dashboard still has them
        return ""


class RayLinesToFile:
    """Sends the lines Ray writes to this process's stderr and stdout to a file, and every other line
    on to the terminal. Its C++ core worker logs to file descriptor 2, bypassing Python, and the driver
    prints what the raylet pushes to it ("(raylet) WARNING: ...") to fd 1; a pipe replaces each and a
    thread per pipe sorts what arrives, line by line; partial lines (a progress bar's '\\r' updates)
    pass at once."""

    FDS = (2, 1)

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.path: Optional[Path] = None

    def __enter__(self):
        if not self.enabled:
            return self
        handle, name = tempfile.mkstemp(prefix="distill-driver-", suffix=".log")
        self.path, self.log = Path(name), os.fdopen(handle, "wb", buffering=0)
        self.lock = threading.Lock()
        self.terminals, self.pumps = {}, []
        for fd in self.FDS:
            (sys.stderr if fd == 2 else sys.stdout).flush()
            self.terminals[fd] = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            pump = threading.Thread(target=self._sort, args=(read_end, self.terminals[fd]), daemon=True)
            pump.start()
            self.pumps.append(pump)
        return self

    def _sort(self, read_end: int, terminal: int) -> None:
        def show(data: bytes) -> None:
            os.write(terminal, data)

        pending, sorting = b"", True
        try:
            while True:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                if not sorting:  # after a failure: pass everything on, never let the pipe fill up and block
                    show(chunk)
                    continue
                try:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        glued = RAY_GLUED.search(line, 1)
                        if glued and not RAY_LINE.match(line):  # a Ray line after a progress bar's partial line
                            show(line[:glued.start()])
                            line = line[glued.start():]
                        (self._keep if RAY_LINE.match(line) else show)(line + b"\n")
                    if pending and not RAY_LINE.match(pending) and not pending.startswith((b"[", b"20", b"(", b"\x1b")):
                        show(pending)
                        pending = b""
                except Exception:  # a full disk under the log file, say
                    sorting = False
                    show(pending)
                    pending = b""
            if pending:
                show(pending)
        finally:
            os.close(read_end)

    def _keep(self, data: bytes) -> None:
        with self.lock:
            self.log.write(data)

    def keep_in(self, folder: Path) -> None:
        """Move the file into the run folder once there is one (appended to `driver.log`: a resumed
        run keeps the earlier attempt's) and go on there."""
        if self.path is None or not folder.is_dir():
            return
        with self.lock:
            target = folder / "driver.log"
            with open(target, "ab") as out:
                out.write(self.path.read_bytes())
            self.log.close()
            self.path.unlink(missing_ok=True)
            self.path, self.log = target, open(target, "ab", buffering=0)

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, terminal in self.terminals.items():
            os.dup2(terminal, fd)  # closes the pipe's last write end here: its pump sees EOF
        for pump in self.pumps:
            pump.join(timeout=2.0)
        if any(pump.is_alive() for pump in self.pumps):  # a child still holds a pipe: leave the pumps their terminals and file
            return False
        for terminal in self.terminals.values():
            os.close(terminal)
        with self.lock:
            self.log.close()
        if self.path.parent == Path(tempfile.gettempdir()):
            from distillation.errors import DistillError

            failed = exc and exc[0] is not None and not issubclass(exc[0], DistillError)  # a refusal is its one line
            if failed and self.path.stat().st_size:  # an unexpected failure before any run folder
                os.write(2, f"[distill] Ray's messages from this process are in {self.path}\n".encode())
            else:
                self.path.unlink(missing_ok=True)
        return False
