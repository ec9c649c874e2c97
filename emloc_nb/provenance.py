"""The provenance of the step this process runs, while a stage writes: recorded in every manifest it writes.

The stage registry (emloc_nb.stages.recording) sets it for a step; emloc_nb.artifacts writes it into
manifests, and emloc_nb.faults reads its step name.
"""

from __future__ import annotations

import contextvars

provenance: contextvars.ContextVar[dict | None] = contextvars.ContextVar("emloc_provenance", default=None)
