"""Fault injection for the fault tests: SIGKILL this process at a named point (EMLOC_FAULT="point:N[@STEP]").

EMLOC_FAULT_ACTION picks another fault there: SIGINT or SIGTERM (the signal, to this process), or ENOSPC (the
write fails as on a full disk).
"""

from __future__ import annotations

import errno
import os
import signal

from .provenance import provenance

ACTIONS = ("SIGKILL", "SIGINT", "SIGTERM", "ENOSPC")


def fault(point: str) -> None:
    """SIGKILL this process the Nth time it passes `point` when EMLOC_FAULT="point:N" (fault tests only).

    "point:N@STEP" counts only passes inside that stage step (emloc_nb.provenance: set by emloc_nb.stages.recording);
    EMLOC_FAULT_ACTION (ACTIONS) replaces the SIGKILL.
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
        action = os.environ.get("EMLOC_FAULT_ACTION", "SIGKILL")
        if action == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {point})")
        os.kill(os.getpid(), getattr(signal, action))


_fault_hits: dict[str, int] = {}
