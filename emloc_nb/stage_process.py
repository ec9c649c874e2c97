"""A stage process: the child emloc_nb.runner starts for each step, which runs it and records its memory."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from . import progress
from .errors import EmlocError, system_error
from .run import Run
from .runner import PARENT_ENV, execute, interrupted, sigterm_interrupts


def _die_with_parent() -> None:
    """A stage child must not outlive the process that started it (it would keep training as an orphan).

    On Linux the kernel kills it when the parent dies (prctl PR_SET_PDEATHSIG); everywhere a
    watcher thread checks the parent's pid once a second, which also covers a parent that died
    before the prctl call.
    """
    parent = int(os.environ.get(PARENT_ENV, "0"))
    if not parent:
        return
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="emloc-parent-watch").start()


def main(argv: list[str] | None = None) -> int:
    """main([RUN_DIR, STEP, --trust-remote-code]) runs one step and records its memory."""
    _die_with_parent()
    args = list(sys.argv[1:] if argv is None else argv)
    trust_remote_code = "--trust-remote-code" in args
    run_dir, step = [a for a in args if a != "--trust-remote-code"][:2]
    progress.stage = step
    if not sys.stderr.isatty():  # datasets' own bars (tokenising) would print carriage returns into the pipe
        import datasets

        datasets.disable_progress_bars()
    try:
        with sigterm_interrupts():
            execute(Run(run_dir, trust_remote_code=trust_remote_code), step, isolated=True)
    except EmlocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a permission: one line, as the command line says it
        print(f"error: {system_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        line, code = interrupted(e)
        print(f"error: {line}", file=sys.stderr)
        return code
    return 0
