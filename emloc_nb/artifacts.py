"""Atomic, pickle-free artifacts: JSON for metadata, safetensors for tensors.

Every artifact is written to a temporary path beside its target and renamed into
place, so an interrupted or failed write never leaves a partial file behind.
torch and safetensors are imported only by the tensor helpers, so that reading and
writing JSON (a run's config, a rank plan) stays light.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EmlocError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1


def _jsonable(obj: Any) -> Any:
    """Make floats JSON-safe (inf/nan become strings) and tensors plain lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _restore_floats(obj: Any) -> Any:
    if isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _restore_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_floats(v) for v in obj]
    return obj


def _usual_mode(full: int) -> int:
    """The mode a plain open()/mkdir() would give; mkstemp/mkdtemp make private 0600/0700 ones."""
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _usual_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EmlocError(f"{path} does not exist. Check the path, or create it with the stage that writes it.")
    return _restore_floats(json.loads(path.read_text()))


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


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensors a safetensors file holds: {name: {"dtype", "shape", "data_offsets"}}, read from its header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def read_tensors(
    path: str | Path, *, dtype: torch.dtype | None = None, device=None, names=None
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (or those in `names`): memory-mapped when they need no conversion and
    stay on the CPU.

    Otherwise each tensor is read into a buffer of its own, converted to `dtype` (floating
    point only) and placed on `device`, and the buffer dropped. A memory map would keep
    every page it read resident until closed: a float32 file loaded as bfloat16 would
    then hold both copies at once.
    """
    import torch
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EmlocError(f"{path} does not exist. Check the path, or create it with the stage that writes it.")
    header = safetensors_header(path)
    if names is not None:
        header = {k: header[k] for k in names}
    device = torch.device(device or "cpu")
    floating = {"F64", "F32", "F16", "BF16"} & {info["dtype"] for info in header.values()}
    converts = dtype is not None and any(_SAFETENSORS_DTYPES[d] != str(dtype).removeprefix("torch.") for d in floating)
    if not converts and device.type == "cpu":
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in header}
    tensors = {}
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        for key, info in header.items():
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise EmlocError(f"{path}: tensor {key} has dtype {info['dtype']}, which emloc-nb does not read.")
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            f.readinto(raw.numpy())
            t = raw.view(getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])).reshape(info["shape"])
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[key] = t.to(device)
    return tensors


def write_grouped(path: str | Path, groups: dict[str, dict[str, torch.Tensor]]) -> None:
    """Per-layer tensors ({layer: {field: tensor}}) in one safetensors file, keyed "layer/field"."""
    write_tensors(path, {f"{name}/{field}": t for name, fields in groups.items() for field, t in fields.items()})


def read_grouped(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(path).items():
        name, field = key.rsplit("/", 1)
        groups.setdefault(name, {})[field] = tensor
    return groups


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `path` only on success."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise EmlocError(
            f"{path} already exists and is not empty. Choose another output directory, "
            "or pass overwrite=True (--overwrite on the command line) to replace it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _usual_mode(0o777))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_fingerprint(expected: str, actual: str, *, artifact: str, model: str) -> None:
    if expected != actual:
        raise EmlocError(
            f"{artifact} belongs to a model with fingerprint {expected}, but {model} has fingerprint {actual}. "
            f"Load the model that {artifact} was built from, or rebuild {artifact} for this model."
        )
