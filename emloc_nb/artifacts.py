"""Artifact directories and their manifests: every artifact says what it is, what produced it, and its checksums.

An artifact directory written with `artifact_dir(path, kind=...)` gets manifest.json: the
SHA-256 of every file in it, the format and package versions, the fingerprint of the model it
belongs to, the settings that produced it (`config`), and, when a run's stage wrote it, that
stage's provenance (`run`: its config sections and the manifests of its inputs; emloc_nb.provenance).
`verify_manifest` checks all of it before anything is loaded. The directory itself is written
atomically (emloc_nb.atomic).

A manifest also records each file's size and a digest per 4 MiB block (`blocks`), so that a finished
stage can be checked cheaply every time a run resumes (`quick=True`): the sizes, every block of a
file up to 16 MiB, and of a larger one its first (the safetensors header) and last blocks and a few
drawn at random. A loader, and anything reported as a run's result, checks the full SHA-256.
A manifest without `blocks` (written before they were) is checked in full either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

from .atomic import atomic_dir
from .errors import EmlocError
from .provenance import provenance
from .serial import jsonable, read_json_object, write_json
from .version import __version__

FORMAT_VERSION = 2  # 2: every artifact directory carries manifest.json
MANIFEST = "manifest.json"


def package_version() -> str:
    return __version__


@contextlib.contextmanager
def artifact_dir(
    path: str | Path,
    *,
    kind: str,
    overwrite: bool = False,
    model_fingerprint: str | None = None,
    config: dict | None = None,
) -> Iterator[Path]:
    """`atomic_dir` for an artifact: the directory gets a manifest listing every file written, before it commits."""
    with atomic_dir(path, overwrite=overwrite) as tmp:
        yield tmp
        write_manifest(tmp, kind=kind, model_fingerprint=model_fingerprint, config=config)


BLOCK = 4 << 20  # bytes per block digest
QUICK_WHOLE = 4  # a file of at most this many blocks is read whole by a quick check
QUICK_SAMPLES = 6  # blocks drawn at random from a larger one, besides its first and last


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:  # gone or unreadable since it was listed: the artifact changed under us
        raise EmlocError(
            f"{path} cannot be read ({e.strerror or e}). Check its permissions, or recreate the artifact."
        ) from None
    return h.hexdigest()


def _digests(path: Path) -> tuple[str, dict]:
    """The SHA-256 of a file and its blocks' record ({"bytes", "sha256": a 64-bit digest per block}), in one read."""
    whole, blocks, size = hashlib.sha256(), [], 0
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                whole.update(block)
                blocks.append(hashlib.sha256(block).hexdigest()[:16])
                size += len(block)
    except OSError as e:  # gone or unreadable since it was listed: the artifact changed under us
        raise EmlocError(
            f"{path} cannot be read ({e.strerror or e}). Check its permissions, or recreate the artifact."
        ) from None
    return whole.hexdigest(), {"bytes": size, "sha256": blocks}


def _quick_matches(path: Path, blocks: dict) -> bool:
    """Whether a file has the recorded size and, in the blocks a quick check reads, the recorded digests."""
    try:
        if path.stat().st_size != blocks["bytes"]:
            return False
        n = len(blocks["sha256"])
        middle = range(1, n - 1)
        picks = range(n) if n <= QUICK_WHOLE else {0, n - 1, *random.sample(middle, min(QUICK_SAMPLES, len(middle)))}
        with path.open("rb") as f:
            for i in sorted(picks):
                f.seek(i * BLOCK)
                if hashlib.sha256(f.read(BLOCK)).hexdigest()[:16] != blocks["sha256"][i]:
                    return False
    except OSError as e:
        raise EmlocError(
            f"{path} cannot be read ({e.strerror or e}). Check its permissions, or recreate the artifact."
        ) from None
    return True


def _files(root: Path) -> list[str]:
    """Every file under `root` as a relative POSIX path, in a stable order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return out


def _manifest(directory: Path, kind: str, files: list[str], model_fingerprint: str | None, config: dict | None):
    digests = {rel: _digests(directory / rel) for rel in files}
    return {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "model_fingerprint": model_fingerprint,
        "config": jsonable(config or {}),
        "run": provenance.get(),
        "files": {rel: whole for rel, (whole, _) in digests.items()},
        "blocks": {"size": BLOCK, "files": {rel: blocks for rel, (_, blocks) in digests.items()}},
    }


def write_manifest(
    directory: Path, *, kind: str, model_fingerprint: str | None = None, config: dict | None = None
) -> None:
    files = [rel for rel in _files(directory) if rel != MANIFEST]
    manifest = _manifest(directory, kind, files, model_fingerprint, config)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


_MANIFEST_FIELDS = {"kind": str, "format_version": int, "package_version": str, "config": dict, "files": dict}


def manifest_file(path: str | Path) -> Path:
    """The manifest file of the artifact directory `path`: the one error for a missing directory or manifest, whoever
    asks (a loader, `Run.verify`, a stage's provenance)."""
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
    return path / MANIFEST


def _blocks_ok(blocks) -> bool:
    """Whether a manifest's `blocks` record has the shape this version writes (absent: an older manifest)."""
    if blocks is None:
        return True
    files = blocks.get("files") if isinstance(blocks, dict) else None
    return (
        isinstance(files, dict)
        and blocks.get("size") == BLOCK
        and all(
            isinstance(b, dict)
            and isinstance(b.get("bytes"), int)
            and b["bytes"] >= 0
            and isinstance(b.get("sha256"), list)
            and all(isinstance(d, str) for d in b["sha256"])
            and len(b["sha256"]) == -(-b["bytes"] // BLOCK)
            for b in files.values()
        )
    )


def read_manifest(path: str | Path) -> dict:
    """The manifest of the artifact directory `path`, checked for shape (not its checksums)."""
    path = Path(path)
    manifest = read_json_object(manifest_file(path), _MANIFEST_FIELDS)
    if manifest["format_version"] != FORMAT_VERSION:
        raise EmlocError(
            f"{path} has format version {manifest['format_version']}; this emloc-nb reads version {FORMAT_VERSION}. "
            f"Recreate it with emloc-nb {package_version()}."
        )
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()):
        raise EmlocError(f"{path}/{MANIFEST} lists files malformed. Recreate the artifact.")
    if not _blocks_ok(manifest.get("blocks")):
        raise EmlocError(f"{path}/{MANIFEST} records its blocks malformed. Recreate the artifact.")
    return manifest


def verify_manifest(
    path: str | Path,
    *,
    kind: str | tuple[str, ...] | None,
    model_fingerprint: str | None = None,
    config: dict | None = None,
    quick: bool = False,
) -> dict:
    """Check the artifact at `path` against its manifest: kind (None: any), every file's SHA-256, no file missing
    or added, and (when given) the model fingerprint and the config that produced it. Returns the manifest.

    `quick`: each file's size and some of its blocks instead of its SHA-256 (see the module's docstring), for a
    finished stage checked on every resume.
    """
    path = Path(path)
    manifest = read_manifest(path)
    kinds = (kind if isinstance(kind, tuple) else (kind,)) if kind is not None else (manifest["kind"],)
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
    blocks = (manifest.get("blocks") or {}).get("files", {})
    for rel, digest in listed.items():
        if quick and isinstance(blocks.get(rel), dict):
            same = _quick_matches(path / rel, blocks[rel])
        else:
            same = _sha256(path / rel) == digest
        if not same:
            raise EmlocError(
                f"{path / rel} does not match its SHA-256 in {MANIFEST}: it was changed or damaged after it was "
                "written. Recreate it (delete the artifact and rerun its stage)."
            )
    if model_fingerprint is not None and manifest.get("model_fingerprint") not in (None, model_fingerprint):
        raise EmlocError(
            f"{path} belongs to a model with fingerprint {manifest['model_fingerprint']}, not {model_fingerprint}. "
            "Use it with the model it was built from, or rebuild it for this model."
        )
    if config is not None and manifest["config"] != jsonable(config):
        raise EmlocError(
            f"{path} was produced by other settings ({differences(manifest['config'], config)}). "
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


def differences(recorded: dict, wanted: dict) -> str:
    """Which keys differ between two config dicts, for error messages."""
    wanted = jsonable(wanted)
    keys = sorted(set(recorded) | set(wanted))
    shown = [
        f"{k}: {recorded.get(k)!r} there, {wanted.get(k)!r} here" for k in keys if recorded.get(k) != wanted.get(k)
    ]
    return "; ".join(shown)[:400]


def manifest_digest(path: str | Path) -> str:
    """SHA-256 of an artifact's manifest: changes whenever any of its files or settings change."""
    return _sha256(manifest_file(path))[:16]


def check_fingerprint(expected: str, actual: str, *, artifact: str, model: str) -> None:
    if expected != actual:
        raise EmlocError(
            f"{artifact} belongs to a model with fingerprint {expected}, but {model} has fingerprint {actual}. "
            f"Load the model that {artifact} was built from, or rebuild {artifact} for this model."
        )
