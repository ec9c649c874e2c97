"""Atomic, checked, pickle-free artifacts: JSON for metadata, safetensors for tensors.

Writing. Every file and directory is written under a unique temporary name beside
its target (`.NAME.tmp-PID-XXXX`), flushed to disk (fsync of the files and of the
directories), then renamed into place: a new target with RENAME_NOREPLACE, an
existing one with an exchange rename (Linux renameat2(RENAME_EXCHANGE)), so the
target is never missing and never half written. Where renameat2 is unavailable, the
old target first moves aside to `.NAME.old-PID-XXXX`; a write that dies between the
two renames is undone by `clean_leftovers` at the next start. `overwrite=False` is
checked at the rename itself, so a competing writer cannot be replaced.

Checking. An artifact directory written with a `kind` gets manifest.json: the
SHA-256 of every file in it, the format and package versions, the fingerprint of
the model it belongs to, the settings that produced it (`config`), and, when a run's
stage wrote it, that stage's provenance (`run`: its config sections and the
manifests of its inputs). `verify_manifest` checks all of it before anything is
loaded.

Locking. `run_lock(directory)` holds an exclusive fcntl lock on DIRECTORY/.lock for
every process that writes into a run, so a second writer fails with a clear message.

torch and safetensors are imported only by the tensor helpers, so that reading and
writing JSON (a run's config, a rank plan) stays light.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EmlocError, first_line
from .version import __version__

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2  # 2: every artifact directory carries manifest.json
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old|del)-(?P<pid>\d+)-[0-9a-f]+$")


def package_version() -> str:
    return __version__


# ----------------------------------------------------------------------------- JSON and tensors


def _jsonable(obj: Any) -> Any:
    """Tensors become plain lists; floats stay floats (inf and nan are written as JSON's Infinity and NaN)."""
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _usual_mode(full: int) -> int:
    """The mode a plain open()/mkdir() would give; temporary files would otherwise stay private."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """The JSON in `path`; a missing, undecodable or malformed file is an EmlocError naming it."""
    path = Path(path)
    if not path.is_file():
        raise EmlocError(f"{path} does not exist. Check the path, or create it with the stage that writes it.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise EmlocError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); it is damaged. Rewrite it."
        ) from None
    except json.JSONDecodeError as e:
        raise EmlocError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); it is damaged. Rewrite it, or recreate it."
        ) from None
    except RecursionError:
        raise EmlocError(f"{path} nests JSON too deeply to be one of ours. Recreate it.") from None


def shard_files(index: Path, remedy: str) -> list[Path]:
    """The safetensors shards a `*.safetensors.index.json` lists, beside it; `remedy` ends the error of a bad index."""
    names = set(read_json_object(index, {"weight_map": dict})["weight_map"].values())
    if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise EmlocError(f"{index} names shards that are not plain file names. {remedy}")
    return [index.parent / name for name in sorted(names)]


def read_json_object(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None) -> dict:
    """`read_json` that must give a JSON object with `required` keys of the given types."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise EmlocError(f"{path} holds a JSON {type(data).__name__}, not an object. Recreate it.")
    for key, kind in (required or {}).items():
        if key not in data:
            raise EmlocError(f"{path} lacks the field {key!r}. Recreate it with the tool that wrote it.")
        if not isinstance(data[key], kind) or (isinstance(data[key], bool) and bool not in _as_tuple(kind)):
            raise EmlocError(f"{path}: field {key!r} is {type(data[key]).__name__}, not {_names(kind)}. Recreate it.")
    return data


def _as_tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp))


_SAFETENSORS_DTYPES = {  # the header's dtype names -> torch dtype names
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _unreadable(path: Path, e: BaseException | str) -> EmlocError:
    text = e if isinstance(e, str) else (str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
    return EmlocError(f"{path} is not a readable safetensors file ({text}). Recreate it.")


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensors a safetensors file holds: {name: {"dtype", "shape", "data_offsets"}}, read from its header.

    A missing file, or a header that is not one (a short file, a length past its end, bad
    JSON, fields of the wrong kind), is an EmlocError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise EmlocError(f"{path} does not exist. Check the path, or create it with the stage that writes it.")
    try:
        total = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            size = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or size > total - 8:
                raise _unreadable(path, "its header length runs past the end of the file")
            header = json.loads(f.read(size))
    except EmlocError:
        raise
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _unreadable(path, e) from None
    if not isinstance(header, dict):
        raise _unreadable(path, f"its header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    data = total - 8 - size
    for key, info in header.items():
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in info["data_offsets"])
            and 0 <= info["data_offsets"][0] <= info["data_offsets"][1] <= data
        )
        if not ok:
            raise _unreadable(path, f"the header entry for tensor {key!r} is malformed")
    return header


def read_tensors(
    path: str | Path, *, dtype: torch.dtype | None = None, device=None, names=None
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (or those in `names`): memory-mapped when they need no conversion and
    stay on the CPU.

    Otherwise each tensor is read into a buffer of its own, converted to `dtype` (floating
    point only) and placed on `device`, and the buffer dropped. A memory map would keep
    every page it read resident until closed: a float32 file loaded as bfloat16 would
    then hold both copies at once. A missing or malformed file is an EmlocError naming it.
    """
    import torch
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EmlocError(f"{path} does not exist. Check the path, or create it with the stage that writes it.")
    header = safetensors_header(path)
    if names is not None:
        missing = [k for k in names if k not in header]
        if missing:
            raise EmlocError(f"{path} lacks the tensor(s) {missing[:3]}. Recreate it with the stage that writes it.")
        header = {k: header[k] for k in names}
    device = torch.device(device or "cpu")
    for key, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise EmlocError(
                f"{path}: tensor {key} has dtype {info['dtype']}, which emloc-nb does not read. Recreate it."
            )
    floating = {"F64", "F32", "F16", "BF16"} & {info["dtype"] for info in header.values()}
    converts = dtype is not None and any(_SAFETENSORS_DTYPES[d] != str(dtype).removeprefix("torch.") for d in floating)
    try:
        if not converts and device.type == "cpu":
            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(key) for key in header}
        tensors = {}
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
            for key, info in header.items():
                begin, end = info["data_offsets"]
                raw = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(start + begin)
                f.readinto(raw.numpy())
                t = raw.view(getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])).reshape(info["shape"])
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                tensors[key] = t.to(device)
        return tensors
    except EmlocError:
        raise
    except Exception as e:  # safetensors raises its own error types, or OSError/ValueError/RuntimeError
        raise _unreadable(path, e) from None


def write_grouped(path: str | Path, groups: dict[str, dict[str, torch.Tensor]]) -> None:
    """Per-layer tensors ({layer: {field: tensor}}) in one safetensors file, keyed "layer/field"."""
    write_tensors(path, {f"{name}/{field}": t for name, fields in groups.items() for field, t in fields.items()})


class StoredGroups(Mapping):
    """The groups of a `write_grouped` file ({layer: {field: tensor}}), each read when asked for and not kept.

    A tensor read from the file keeps its memory-mapped pages resident while it lives, so a
    caller going layer by layer holds one layer's tensors, not the whole file's. Each read
    checks that the file is still the one opened here (a stage may have rewritten it).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fields: dict[str, list[str]] = {}
        for key in safetensors_header(self.path):
            if "/" not in key:
                raise EmlocError(f"{self.path} holds the tensor {key!r}, not a 'layer/field' one. Recreate it.")
            name, field = key.rsplit("/", 1)
            self.fields.setdefault(name, []).append(field)
        self._stamp = _file_stamp(self.path)

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        fields = self.fields[name]
        if _file_stamp(self.path) != self._stamp:
            raise EmlocError(f"{self.path} changed after it was opened (a stage rewrote it). Load the report again.")
        tensors = read_tensors(self.path, names=[f"{name}/{f}" for f in fields])
        return {f: tensors[f"{name}/{f}"] for f in fields}

    def read_all(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every group, from one read of the file."""
        tensors = read_tensors(self.path)
        return {name: {f: tensors[f"{name}/{f}"] for f in fields} for name, fields in self.fields.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


# ----------------------------------------------------------------------------- durable renames


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
        os.chmod(tmp, _usual_mode(0o666))
        _fsync(tmp)
        fault("commit")
        os.replace(tmp, path)  # a file is replaced in one step
        _fsync(path.parent, directory=True)
    finally:
        tmp.unlink(missing_ok=True)


# The stage provenance that atomic_dir records in manifests ("run"); set by emloc_nb.stages for a step.
provenance: contextvars.ContextVar[dict | None] = contextvars.ContextVar("emloc_provenance", default=None)


@contextlib.contextmanager
def atomic_dir(
    path: str | Path,
    *,
    overwrite: bool = False,
    kind: str | None = None,
    model_fingerprint: str | None = None,
    config: dict | None = None,
) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `path` only on success.

    With `kind`, the directory gets a manifest (see the module docstring) listing every file written.
    """
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
        if kind is not None:
            write_manifest(tmp, kind=kind, model_fingerprint=model_fingerprint, config=config)
        os.chmod(tmp, _usual_mode(0o777))
        _fsync_tree(tmp)
        _commit(tmp, path, overwrite=overwrite)
    finally:
        _remove(tmp)


def _alive(pid: int) -> bool:
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
            if not m or (only is not None and m["name"] != only) or _alive(int(m["pid"])):
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


# ----------------------------------------------------------------------------- manifests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Every file under `root` as a relative POSIX path, in a stable order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return out


def _manifest(directory: Path, kind: str, files: list[str], model_fingerprint: str | None, config: dict | None):
    return {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "model_fingerprint": model_fingerprint,
        "config": _jsonable(config or {}),
        "run": provenance.get(),
        "files": {rel: _sha256(directory / rel) for rel in files},
    }


def write_manifest(
    directory: Path, *, kind: str, model_fingerprint: str | None = None, config: dict | None = None
) -> None:
    files = [rel for rel in _files(directory) if rel != MANIFEST]
    manifest = _manifest(directory, kind, files, model_fingerprint, config)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


_MANIFEST_FIELDS = {"kind": str, "format_version": int, "package_version": str, "config": dict, "files": dict}


def read_manifest(path: str | Path) -> dict:
    """The manifest of the artifact directory `path`, checked for shape (not its checksums)."""
    path = Path(path)
    if path.is_file():
        raise EmlocError(f"{path} is a file, not an artifact directory. Point at the directory that holds {MANIFEST}.")
    if not path.is_dir():
        raise EmlocError(f"{path} does not exist. Check the path, or create it with the stage that writes it.")
    if not (path / MANIFEST).is_file():
        raise EmlocError(
            f"{path} has no {MANIFEST}, so it was not written by this version of emloc-nb and cannot be checked. "
            "Recreate it (delete it and rerun its stage)."
        )
    manifest = read_json_object(path / MANIFEST, _MANIFEST_FIELDS)
    if manifest["format_version"] != FORMAT_VERSION:
        raise EmlocError(
            f"{path} has format version {manifest['format_version']}; this emloc-nb reads version {FORMAT_VERSION}. "
            f"Recreate it with emloc-nb {package_version()}."
        )
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()):
        raise EmlocError(f"{path}/{MANIFEST} lists files malformed. Recreate the artifact.")
    return manifest


def verify_manifest(
    path: str | Path,
    *,
    kind: str | tuple[str, ...] | None,
    model_fingerprint: str | None = None,
    config: dict | None = None,
) -> dict:
    """Check the artifact at `path` against its manifest: kind (None: any), every file's SHA-256, no file missing
    or added, and (when given) the model fingerprint and the config that produced it. Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    kinds = _as_tuple(kind) if kind is not None else (manifest["kind"],)
    if manifest["kind"] not in kinds:
        raise EmlocError(
            f"{path} holds a {manifest['kind']!r} artifact, not {' or '.join(map(repr, kinds))}. "
            "Point at the right directory."
        )
    listed, present = manifest["files"], set(_files(path)) - {MANIFEST}
    missing = sorted(set(listed) - present)
    extra = sorted(present - set(listed))
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"holds files its manifest does not list: {extra[:3]}"
        raise EmlocError(
            f"{path} {what}. It is incomplete or was changed: recreate it (delete it and rerun its stage)."
        )
    for rel, digest in listed.items():
        if _sha256(path / rel) != digest:
            raise EmlocError(
                f"{path / rel} does not match its SHA-256 in {MANIFEST}: it was changed or damaged after it was "
                "written. Recreate it (delete the artifact and rerun its stage)."
            )
    if model_fingerprint is not None and manifest.get("model_fingerprint") not in (None, model_fingerprint):
        raise EmlocError(
            f"{path} belongs to a model with fingerprint {manifest['model_fingerprint']}, not {model_fingerprint}. "
            "Use it with the model it was built from, or rebuild it for this model."
        )
    if config is not None and manifest["config"] != _jsonable(config):
        raise EmlocError(
            f"{path} was produced by other settings ({_differences(manifest['config'], config)}). "
            "Use matching settings, or recreate it."
        )
    return manifest


def write_side_manifest(
    directory: Path,
    name: str,
    *,
    kind: str,
    files: list[str],
    model_fingerprint: str | None = None,
    config: dict | None = None,
) -> None:
    """A manifest for some of a directory's files (an artifact that shares its directory), written atomically."""
    write_json(Path(directory) / name, _manifest(Path(directory), kind, files, model_fingerprint, config))


def verify_side_manifest(directory: str | Path, name: str, *, kind: str) -> dict:
    """Check the files a `write_side_manifest` manifest lists (kind, each file's SHA-256); return the manifest."""
    directory = Path(directory)
    manifest = read_json_object(directory / name, _MANIFEST_FIELDS)
    if manifest["kind"] != kind:
        raise EmlocError(f"{directory / name} is the manifest of a {manifest['kind']!r}, not {kind!r}. Recreate it.")
    if manifest["format_version"] != FORMAT_VERSION:
        raise EmlocError(
            f"{directory / name} has format version {manifest['format_version']}; this emloc-nb reads version "
            f"{FORMAT_VERSION}. Recreate it with emloc-nb {package_version()}."
        )
    for rel, digest in manifest["files"].items():
        path = directory / str(rel)
        if not isinstance(rel, str) or Path(rel).name != rel or not isinstance(digest, str):
            raise EmlocError(f"{directory / name} lists files malformed. Recreate the {kind}.")
        if not path.is_file():
            raise EmlocError(f"{path} is missing, though {name} lists it. Recreate the {kind}.")
        if _sha256(path) != digest:
            raise EmlocError(
                f"{path} does not match its SHA-256 in {name}: it was changed or damaged after it was written. "
                f"Recreate the {kind}."
            )
    return manifest


def _differences(recorded: dict, wanted: dict) -> str:
    wanted = _jsonable(wanted)
    keys = sorted(set(recorded) | set(wanted))
    shown = [
        f"{k}: {recorded.get(k)!r} there, {wanted.get(k)!r} here" for k in keys if recorded.get(k) != wanted.get(k)
    ]
    return "; ".join(shown)[:400]


def differences(recorded: dict, wanted: dict) -> str:
    """Which keys differ between two config dicts, for error messages."""
    return _differences(recorded, wanted)


def manifest_digest(path: str | Path) -> str:
    """SHA-256 of an artifact's manifest: changes whenever any of its files or settings change."""
    return _sha256(Path(path) / MANIFEST)[:16]


def check_fingerprint(expected: str, actual: str, *, artifact: str, model: str) -> None:
    if expected != actual:
        raise EmlocError(
            f"{artifact} belongs to a model with fingerprint {expected}, but {model} has fingerprint {actual}. "
            f"Load the model that {artifact} was built from, or rebuild {artifact} for this model."
        )


# ----------------------------------------------------------------------------- the run lock

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
        if text.isdigit() and _alive(int(text)):
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
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, _usual_mode(0o666))
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


# ----------------------------------------------------------------------------- fault injection for the kill tests


def fault(point: str) -> None:
    """SIGKILL this process the Nth time it passes `point` when EMLOC_FAULT="point:N" (kill tests only).

    "point:N@STEP" counts only passes inside that stage step (see emloc_nb.stages.recording).
    """
    spec = os.environ.get("EMLOC_FAULT")
    if not spec:
        return
    spec, _, step = spec.partition("@")
    name, _, count = spec.partition(":")
    if name != point or (step and not (provenance.get() or {}).get("step", "").startswith(step)):
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] == int(count or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_fault_hits: dict[str, int] = {}
