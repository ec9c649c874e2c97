"""How many threads torch uses in a stage: the run setting `threads`, "auto" or a count ≥ 1.

Fine-tuning one example at a time runs thousands of small parallel regions a step, and each
region waits for its slowest thread. On a small machine that also runs other work, one thread is
often descheduled, and every region waits for it. Issue 31 measured four LoRA steps of the
default recipe on the original model, on 2 cores: idle, 5.2 s a step on 1 thread and 3.5 s on 2;
beside one busy process, 5.4 s against 14.9 s; beside two, 8.3 s against 21.9 s.

"auto" resolves to (`resolve_threads`):
- OMP_NUM_THREADS, when the environment sets it: the caller's choice wins;
- else 1 thread on a machine with at most SMALL_MACHINE cores. bench/threads.py chooses a policy from
  such timings by one rule (its `choose_policy`): a policy that loses at most 10% when idle and never
  collapses more than 2× beside one busy process beats one that is fastest only when idle; where no
  policy meets both, the one that never collapses wins. On bench/results/threads.md (a 2-core Xeon) that
  is 1 thread: beside one busy process it takes at most ×2.0 the fastest idle time, 2 threads ×4.8 (issue
  31's AMD timings chose the same). Change AUTO_THREADS if a run of it chooses otherwise;
- else torch's own default (not measured on larger machines).

With one thread OMP_WAIT_POLICY moved no time consistently (either way by up to 15%), so it is left
alone. A stage process gets the count through OMP_NUM_THREADS and MKL_NUM_THREADS in its environment
(set before torch loads) and torch.set_num_threads; a stage run in the caller's process uses it while
the stage runs, then puts the caller's count back (`using_threads`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .errors import EmlocError

SMALL_MACHINE = 4  # cores; at most this many, "auto" means AUTO_THREADS
AUTO_THREADS = 1  # chosen by bench/threads.py's rule on 2 cores (bench/results/threads.md; see above)


def check_threads(value, name: str) -> None:
    """The `threads` setting: "auto" or a whole number ≥ 1."""
    if (isinstance(value, str) and value != "auto") or (isinstance(value, int) and value < 1):
        raise EmlocError(
            f"{name}={value!r}: use auto (1 thread on a machine of up to {SMALL_MACHINE} cores) "
            "or a number of threads ≥ 1."
        )


def available_cores() -> int:
    """The cores this process may run on (its affinity, where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def resolve_threads(setting: int | str, *, cores: int | None = None, environ=os.environ) -> int | None:
    """The thread count a stage uses for the setting: a number, or None for torch's default (see the module)."""
    if setting != "auto":
        return int(setting)
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return int(given)
    n = available_cores() if cores is None else cores
    return AUTO_THREADS if n <= SMALL_MACHINE else None


def thread_env(setting: int | str) -> dict[str, str]:
    """What a stage process's environment gets, so the libraries start with that many threads."""
    n = resolve_threads(setting)
    return {} if n is None else {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


@contextlib.contextmanager
def using_threads(setting: int | str) -> Iterator[int]:
    """torch runs on the setting's threads inside the block, and on as many as before after it; yields the count."""
    import torch

    before = torch.get_num_threads()
    n = resolve_threads(setting)
    if n is None or n == before:
        yield before
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
