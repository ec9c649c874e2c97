"""The run lock: one process at a time writes into a run directory.

`run_lock(directory)` holds an exclusive fcntl lock on DIRECTORY/.lock for every process that
writes into a run, so a second writer fails with a clear message. A stage process shares its
parent's lock through an inherited descriptor (LOCK_ENV).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .atomic import alive, clean_leftovers, usual_mode
from .errors import EmlocError

LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # real path of the locked directory -> [fd, depth]
LOCK_ENV = "EMLOC_RUN_LOCK"  # "FD:PATH": a stage child shares its parent's lock through this inherited descriptor


_PID_WIDTH = 12  # the holder writes its pid padded to a fixed width, so the file is never seen empty or half-old


def _lock_owner(fd: int, wait_s: float = 1.0) -> str:
    """The " (pid N)" of the live process holding the lock, or "" if none shows up within `wait_s`.

    The holder writes its pid just after taking the lock; a reader that loses the race waits for it.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        except OSError:
            return ""
        if text.isdigit() and alive(int(text)):
            return f" (pid {text})"
        if time.monotonic() >= deadline:
            return ""
        time.sleep(0.02)


@contextlib.contextmanager
def run_lock(directory: str | Path) -> Iterator[int]:
    """Hold the exclusive write lock of a run directory (re-entrant in a process); yield its descriptor.

    A second process that tries to write fails at once with an EmlocError saying who holds it.
    """
    import fcntl

    directory = Path(directory)
    key = os.path.realpath(directory)
    if key in _held:
        _held[key][1] += 1
        try:
            yield _held[key][0]
        finally:
            _held[key][1] -= 1
        return
    inherited = os.environ.get(LOCK_ENV, "")
    fd_text, _, locked_path = inherited.partition(":")
    fd = None
    if locked_path == key and fd_text.isdigit():
        with contextlib.suppress(OSError):
            if os.fstat(int(fd_text)).st_ino == os.stat(directory / LOCK_FILE).st_ino:
                fd = int(fd_text)  # the parent's lock, shared: flock below succeeds on the same open file
    own = fd is None
    if own:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, usual_mode(0o666))
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise EmlocError(
                f"{directory} is not writable here ({e.strerror}), and every command that may run a stage takes the "
                "run's lock in it first. Make it writable, or copy the run to a folder you can write to; its "
                "results and artifacts stay readable as they are (Run(...) loaders, `emloc report --output FILE`)."
            ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _lock_owner(fd)
        if own:
            os.close(fd)
        raise EmlocError(
            f"Another emloc process{owner} is writing to {directory}. Wait for it to finish (or stop it), then retry."
        ) from None
    if own:
        os.pwrite(fd, str(os.getpid()).rjust(_PID_WIDTH).encode(), 0)
        os.ftruncate(fd, _PID_WIDTH)
    _held[key] = [fd, 1]
    try:
        for line in clean_leftovers(directory, recursive=True):
            print(f"[emloc] {line}", file=sys.stderr)
        yield fd
    finally:
        del _held[key]
        if own:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
