"""Fault injection for the kill tests: SIGKILL this process at a named point (EMLOC_FAULT="point:N[@STEP]")."""

from __future__ import annotations

import os
import signal

from .provenance import provenance


def fault(point: str) -> None:
    """SIGKILL this process the Nth time it passes `point` when EMLOC_FAULT="point:N" (kill tests only).

    "point:N@STEP" counts only passes inside that stage step (emloc_nb.provenance: set by emloc_nb.stages.recording).
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
        os.kill(os.getpid(), signal.SIGKILL)


_fault_hits: dict[str, int] = {}
