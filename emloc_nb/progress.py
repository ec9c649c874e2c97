"""Progress of the long loops: a tqdm bar where someone watches it, else a line every few seconds.

A terminal or a notebook gets tqdm. A stage process writes to a pipe that its parent
forwards (`emloc run`, `make demo`), where a bar would stay silent or pile up
carriage returns; there each loop prints a line when it starts, every
EMLOC_PROGRESS_SECONDS (default 5) and when it ends:

    [progress] finetune_emulator · finetune 12/60 (20%) · 1m23s elapsed · 6.92 s/it · 5m31s left

The seconds per item are the loop's average; the time left is the items left × the seconds per item
over the last RECENT items, so it follows a machine whose load changes.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator

PREFIX = "[progress]"
stage: str | None = None  # the stage this process runs (set by emloc_nb.stage_process.main), named in each line
RECENT = 20  # items whose pace the time left is estimated from


def progress(
    iterable: Iterable, *, desc: str, total: int | None = None, initial: int = 0, enabled: bool = True
) -> Iterable:
    """`iterable`, reporting its progress on stderr (a bar or lines, see the module) unless not `enabled`."""
    if not enabled:
        return iterable
    if _in_notebook() or sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable) + initial
    return _lines(iterable, desc, total, initial, float(os.environ.get("EMLOC_PROGRESS_SECONDS", "5")))


def _in_notebook() -> bool:
    """A Jupyter kernel runs this (checked without importing IPython, which the core never does itself)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def duration(seconds: float) -> str:
    """4.2s, 1m23s, 2h05m."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def progress_line(
    desc: str, done: int, total: int | None, initial: int, elapsed: float, recent: float | None = None
) -> str:
    """One progress line; `recent`: seconds per item lately, for the time left (items left × recent)."""
    where = f"{stage} · {desc}" if stage else desc
    count = f"{done}/{total} ({done / total:.0%})" if total else str(done)
    line = f"{PREFIX} {where} {count} · {duration(elapsed)} elapsed"
    steps = done - initial
    if steps > 0 and elapsed > 0:
        per = elapsed / steps
        line += f" · {per:.2f} s/it" if per >= 1 else f" · {1 / per:.1f} it/s"
    if total and done < total and recent:
        line += f" · {duration((total - done) * recent)} left"
    return line


def recent_pace(marks: Iterable[tuple[float, int]]) -> float | None:
    """Seconds per item between the first and the last (time, items done) mark; None before an item is done."""
    marks = list(marks)
    if len(marks) < 2 or marks[-1][1] <= marks[0][1]:
        return None
    return (marks[-1][0] - marks[0][0]) / (marks[-1][1] - marks[0][1])


def _lines(iterable: Iterable, desc: str, total: int | None, initial: int, every: float) -> Iterator:
    started = last = time.monotonic()
    done = initial
    marks = deque([(started, done)], maxlen=RECENT + 1)

    def report(now: float) -> None:
        print(progress_line(desc, done, total, initial, now - started, recent_pace(marks)), file=sys.stderr, flush=True)

    report(started)
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        marks.append((now, done))
        if now - last >= every or done == total:
            report(now)
            last = now
    if done != total and total is not None and done > initial:  # ended early (stop_after)
        report(time.monotonic())
