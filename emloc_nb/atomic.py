"""Atomic, durable writes: a file or directory is complete exactly when its path exists.

Every file and directory is written under a unique temporary name beside its target
(`.NAME.tmp-PID-XXXX`), flushed to disk (fsync of the files and of the directories), then
renamed into place: a new target with RENAME_NOREPLACE, an existing one with an exchange
rename (Linux renameat2(RENAME_EXCHANGE)), so the target is never missing and never half
written. Where renameat2 is unavailable, the old target first moves aside to
`.NAME.old-PID-XXXX`; a write that dies between the two renames is undone by
`clean_leftovers` at the next start. `overwrite=False` is checked at the rename itself, so a
competing writer cannot be replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import EmlocError, first_line
from .faults import fault

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old|del)-(?P<pid>\d+)-[0-9a-f]+$")


def usual_mode(full: int) -> int:
    """The mode a plain open()/mkdir() would give; temporary files would otherwise stay private."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def _fsync(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open a directory for fsync
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # filesystems without fsync on directories
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    if root.is_file():
        _fsync(root)
        return
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath), directory=True)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_renameat2_fn: Any = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) through ctypes: True when done, False where the system or filesystem lacks it."""
    global _renameat2_fn
    if not sys.platform.startswith("linux") or os.environ.get("EMLOC_NO_RENAMEAT2"):
        return False
    if _renameat2_fn is None:
        _renameat2_fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", False)
    if not _renameat2_fn:
        return False
    at_fdcwd = -100
    if _renameat2_fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _temp_name(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _not_empty_error(path: Path) -> EmlocError:
    return EmlocError(
        f"{path} already exists and is not empty. Choose another output path, "
        "or pass overwrite=True (--overwrite on the command line) to replace it."
    )


def _commit(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Move the finished `tmp` to `path` in one step; `overwrite=False` refuses a non-empty `path` right here."""
    fault("commit")
    while True:
        if not os.path.lexists(path):
            try:
                if not _renameat2(tmp, path, _RENAME_NOREPLACE):
                    os.rename(tmp, path)
                break
            except FileExistsError:
                continue  # another writer got there first: decide again
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue
        if not overwrite:
            if path.is_dir() and not path.is_symlink():
                try:
                    os.rmdir(path)  # an empty directory may be replaced; rmdir fails on a non-empty one
                    continue
                except OSError:
                    pass
            raise _not_empty_error(path)
        if _renameat2(tmp, path, _RENAME_EXCHANGE):
            _remove(tmp)  # now holds the old artifact
            break
        old = _temp_name(path, "old")
        os.rename(path, old)
        fault("commit-between")  # the window `clean_leftovers` repairs
        os.rename(tmp, path)
        _remove(old)
        break
    _fsync(path.parent, directory=True)


# ----------------------------------------------------------------------------- atomic files and directories


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces `path` (a file) when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise EmlocError(f"Nothing was written to {path}. This is a bug in the writer; please report it.")
        os.chmod(tmp, usual_mode(0o666))
        _fsync(tmp)
        fault("commit")
        os.replace(tmp, path)  # a file is replaced in one step
        _fsync(path.parent, directory=True)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `path` only on success (emloc_nb.artifacts.artifact_dir:
    the same, with a manifest)."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:  # fail fast; checked again at the rename
        raise _not_empty_error(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder should be, or no permission
        raise EmlocError(
            f"Cannot create {path.parent} ({first_line(e)}). Choose an output under a writable folder."
        ) from None
    clean_leftovers(path.parent, only=path.name)
    tmp = _temp_name(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        os.chmod(tmp, usual_mode(0o777))
        _fsync_tree(tmp)
        _commit(tmp, path, overwrite=overwrite)
    finally:
        _remove(tmp)


def alive(pid: int) -> bool:
    """Whether the process `pid` (a writer named in a temporary's or a lock's file) still runs."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(directory: str | Path, *, recursive: bool = False, only: str | None = None) -> list[str]:
    """Remove the temporaries of writers that died; put back an artifact a two-step rename left aside.

    A leftover's name carries its writer's process id, so a live writer's files are left alone.
    Returns what was done, one line each.
    """
    directory = Path(directory)
    done: list[str] = []
    if not directory.is_dir():
        return done
    walk = os.walk(directory) if recursive else [(str(directory), [], [])]
    for dirpath, _, _ in walk:
        try:
            entries = list(os.scandir(dirpath))
        except OSError:
            continue
        for entry in entries:
            m = _LEFTOVER.match(entry.name)
            if not m or (only is not None and m["name"] != only) or alive(int(m["pid"])):
                continue
            leftover, target = Path(entry.path), Path(dirpath) / m["name"]
            if m["what"] == "old" and not os.path.lexists(target):
                os.rename(leftover, target)  # the writer died between its two renames: the old one is current
                done.append(f"restored {target} from {leftover.name}")
            else:
                _remove(leftover)
                done.append(f"removed {leftover}")
    return done


def discard(path: str | Path) -> None:
    """Remove a file or directory in one visible step: it moves to a temporary name first, then goes."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    trash = _temp_name(path, "del")
    os.rename(path, trash)
    _fsync(path.parent, directory=True)
    _remove(trash)


def is_leftover(name: str) -> bool:
    """Whether `name` is one of the temporary names atomic writes use."""
    return bool(_LEFTOVER.match(name))
