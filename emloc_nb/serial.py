"""Files of JSON and safetensors, written atomically and read with checks: a bad file is an EmlocError naming it.

Pickle-free: metadata is JSON, tensors are safetensors. torch and safetensors are imported only by
the tensor helpers, so that reading and writing JSON (a run's config, a rank plan) stays light.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_path
from .errors import DuplicateKey, EmlocError, loads_json

if TYPE_CHECKING:
    import torch


def jsonable(obj: Any) -> Any:
    """Tensors become plain lists; floats stay floats (inf and nan are written as JSON's Infinity and NaN)."""
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """The JSON in `path`; a missing, undecodable or malformed file, or one that names a key twice, is an
    EmlocError naming it."""
    path = Path(path)
    if path.is_dir():
        raise EmlocError(f"{path} is a directory, not a JSON file. Point at the file itself.")
    if not path.is_file():
        raise EmlocError(f"{path} does not exist. Check the path, or create it with the stage that writes it.")
    try:
        return loads_json(path.read_text(encoding="utf-8"))
    except DuplicateKey as e:
        raise EmlocError(e.explain(str(path))) from None
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
        try:
            save_file(tensors, str(tmp))
        except Exception as e:  # safetensors' own error type, also for a system error (a full disk): an OSError here
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


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
