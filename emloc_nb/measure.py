"""Measured memory: each phase's peak resident memory (and peak CUDA memory), the resident set now, and the
bytes a model's weights take.

`PhaseMeter` measures: inside it, each `phase("load")`, `phase("train_steps")`, ...
records the peak resident memory of that phase alone (and the peak CUDA memory on a
GPU). The peak is reset at the start of each phase:
- on Linux, by writing 5 to /proc/self/clear_refs, which resets VmHWM;
- elsewhere (macOS, Windows), by a thread that samples the resident set (psutil);
- on CUDA, by torch.cuda.reset_peak_memory_stats.
The functions of the pipeline mark their own phases (load_model: "load", collect_stats:
"calibration", build_emulator: "factoring", finetune: "train_first_step" then
"train_steps", the steady state, evaluate: "evaluation", ...); outside a PhaseMeter a
phase costs nothing and records nothing.

Every layer marks phases, so this module sits at the bottom: it imports nothing of emloc-nb,
and not torch either (CUDA peaks are read only once torch is loaded; before that none can exist).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

MB = 2**20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    """A /proc/self/status field (VmRSS, VmHWM) in MB, or None off Linux."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def rss_mb() -> float:
    """Current resident set size of this process."""
    value = _status_mb("VmRSS")
    if value is not None:
        return value
    import psutil  # a dependency of accelerate

    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started, or since the last peak reset (Linux)."""
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    import resource

    # macOS reports ru_maxrss in bytes, Linux in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (MB if sys.platform == "darwin" else 1024)


class _ClearRefs:
    """Linux: the kernel keeps the peak (VmHWM); writing 5 to clear_refs resets it to the current RSS."""

    @staticmethod
    def available() -> bool:
        if _status_mb("VmHWM") is None:
            return False
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True

    def reset(self) -> None:
        _CLEAR_REFS.write_text("5")

    def peak(self) -> float:
        return _status_mb("VmHWM")

    def close(self) -> None:
        pass


class _Sampler:
    """Elsewhere: a daemon thread samples the resident set every `interval` seconds and keeps the maximum.

    Allocations shorter than the interval can be missed; the kernel's own peak (Linux) cannot.
    """

    def __init__(self, interval: float = 0.005):
        self._peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._peak = max(self._peak, rss_mb())

    def reset(self) -> None:
        self._peak = rss_mb()

    def peak(self) -> float:
        self._peak = max(self._peak, rss_mb())
        return self._peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _cuda_devices() -> list[int]:
    torch = sys.modules.get("torch")  # CUDA can only be in use once torch is imported
    if torch is None or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    return list(range(torch.cuda.device_count()))


def _cuda_reset() -> None:
    for d in _cuda_devices():
        sys.modules["torch"].cuda.reset_peak_memory_stats(d)


def _cuda_peak_mb() -> float | None:
    devices = _cuda_devices()
    return sum(sys.modules["torch"].cuda.max_memory_allocated(d) for d in devices) / MB if devices else None


MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold, which it otherwise raises as blocks are freed


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc give large freed blocks back to the OS at once; True if it applied (glibc only).

    By default glibc raises its mmap threshold each time a large block is freed, so later
    large tensors (activations, gradients) come from its heap, and once freed they stay
    in the process: after the first training step the resident set never falls back. A
    fixed threshold serves each block above it by its own mmap, returned when freed
    (bench/results/transients.md measures what this saves and costs).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, int(threshold)))


def huge_pages_env(environ: dict | None = None) -> dict:
    """The environment for a child process whose malloc backs its large mappings by transparent huge pages.

    Under a fixed mmap threshold every large block is mapped and faulted in anew, 4 KiB at a time; glibc 2.35
    and later ask the kernel for 2 MiB pages on such mappings (madvise), 1/512 of the faults
    (bench/results/heap_policy.md). Older glibc ignores the tunable, other libcs the variable. A hugetlb
    setting of the caller's own is kept.
    """
    tunables = [t for t in (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        tunables.append("glibc.malloc.hugetlb=1")
    return {"GLIBC_TUNABLES": ":".join(tunables)}


_ACTIVE: contextvars.ContextVar[PhaseMeter | None] = contextvars.ContextVar("emloc_phase_meter", default=None)


class PhaseMeter:
    """Peak memory (and seconds) per phase of the code run inside it.

        with PhaseMeter() as meter:
            with phase("load"):
                ...
        meter.phases   # {"load": {"peak_rss_mb", "start_rss_mb", "end_rss_mb", "seconds"[, "peak_cuda_mb"]}}
        meter.peak_rss_mb   # the peak over everything run inside the meter

    Phases may nest: an inner phase's peak counts toward the outer one's too. A phase
    entered again under the same name keeps its largest peak and adds up its seconds.
    """

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self._open: list[dict] = []  # running maxima of the phases now open, outermost first
        self._overall = {"rss": 0.0, "cuda": None}
        self._source = None
        self._token = None

    @property
    def method(self) -> str:
        return "clear_refs" if isinstance(self._source, _ClearRefs) else "sampled"

    @property
    def peak_rss_mb(self) -> float:
        self._fold()
        return self._overall["rss"]

    @property
    def peak_cuda_mb(self) -> float | None:
        self._fold()
        return self._overall["cuda"]

    def __enter__(self) -> PhaseMeter:
        self._source = _ClearRefs() if _ClearRefs.available() else _Sampler()
        self._reset()
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        self._fold()
        _ACTIVE.reset(self._token)
        self._source.close()

    def _fold(self) -> None:
        """Carry the peak since the last reset into every open phase and the overall peak."""
        rss, cuda = self._source.peak(), _cuda_peak_mb()
        for running in [*self._open, self._overall]:
            running["rss"] = max(running["rss"], rss)
            if cuda is not None:
                running["cuda"] = max(running["cuda"] or 0.0, cuda)

    def _reset(self) -> None:
        self._source.reset()
        _cuda_reset()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._fold()
        self._reset()
        start = rss_mb()
        running = {"rss": start, "cuda": None}
        self._open.append(running)
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self._fold()
            self._open.pop()
            record = {
                "peak_rss_mb": running["rss"],
                "start_rss_mb": start,
                "end_rss_mb": rss_mb(),
                "seconds": seconds,
            }
            if running["cuda"] is not None:
                record["peak_cuda_mb"] = running["cuda"]
            old = self.phases.get(name)
            if old is not None:  # the same phase again: its largest peak, its total time
                record = {
                    **record,
                    "peak_rss_mb": max(old["peak_rss_mb"], record["peak_rss_mb"]),
                    "start_rss_mb": old["start_rss_mb"],
                    "seconds": old["seconds"] + seconds,
                }
                if "peak_cuda_mb" in old:
                    record["peak_cuda_mb"] = max(old["peak_cuda_mb"], record.get("peak_cuda_mb", 0.0))
            self.phases[name] = record


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Record the enclosed code as phase `name` of the active PhaseMeter; without one, do nothing."""
    meter = _ACTIVE.get()
    if meter is None:
        yield
        return
    with meter.phase(name):
        yield


def tensor_bytes(tensors) -> int:
    """The bytes of the storages behind `tensors`, each counted once (views and tied weights share one)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def weights_mb(model: nn.Module) -> float:
    """Unique parameter and buffer bytes (tied weights count once)."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers())) / MB
