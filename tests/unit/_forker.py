"""A process that imports emloc-nb (torch, transformers, peft) once, then forks one fresh `emloc` process per job.

The kill tests need dozens of real processes to SIGKILL; starting each from scratch
would spend most of the time importing. Every job is still its own process, killed
for real. Sockets are refused (and counted) in all of them: nothing may use the network.

Protocol, one JSON object per line on stdin: {"jobs": [{"argv": [...] (or "code": Python source),
"fault": "commit:2@drift" | null, "action": "SIGINT" | "SIGTERM" | "ENOSPC" | null (SIGKILL),
"start_after" / "kill_after": seconds | null, "log": path}]},
run at the same time;
the reply on stdout is {"codes": [...]} (-9: killed).
"""

import json
import os
import signal
import socket
import sys
import time
import traceback

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's thread pool must not exist across fork()
# One thread per job: the tests compare a resumed run's bytes with an uninterrupted one's, and with two threads
# the last bits of a resumed fine-tuning differ in about one run in five (the same to float rounding).
os.environ["OMP_NUM_THREADS"] = "1"
attempts: list = []


def _refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("the network is blocked in this test")


socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = socket.getaddrinfo = _refuse

import datasets  # noqa: E402
import peft  # noqa: E402, F401
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401

import emloc_nb.correction  # noqa: E402, F401
import emloc_nb.emulator_drift  # noqa: E402, F401
import emloc_nb.evaluation  # noqa: E402, F401
import emloc_nb.training  # noqa: E402, F401
from emloc_nb import faults  # noqa: E402
from emloc_nb.cli import main  # noqa: E402

datasets.disable_progress_bars()


def _child(job: dict) -> None:
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.pop("EMLOC_FAULT", None)
    os.environ.pop("EMLOC_FAULT_ACTION", None)
    if job.get("fault"):
        os.environ["EMLOC_FAULT"] = job["fault"]
        os.environ["EMLOC_FAULT_ACTION"] = job.get("action") or "SIGKILL"
    faults._fault_hits.clear()
    # A shell starts a background job (`pytest ... &`) with SIGINT ignored, and Python then keeps it ignored:
    # restore Ctrl-C's KeyboardInterrupt, as in a terminal, for the SIGINT tests.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    time.sleep(job.get("start_after") or 0)
    code = 99
    try:
        code = main(job["argv"]) if "code" not in job else exec(job["code"]) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        print(f"network attempts: {len(attempts)}", flush=True)
        sys.stderr.flush()
    os._exit(code)


print("ready", flush=True)
for line in sys.stdin:
    jobs = json.loads(line)["jobs"]
    pids = []
    for job in jobs:
        pid = os.fork()
        if pid == 0:
            _child(job)
        pids.append(pid)
    started = time.time()
    for pid, job in zip(pids, jobs):
        if job.get("kill_after") is not None:
            time.sleep(max(0.0, started + job["kill_after"] - time.time()))
            os.kill(pid, signal.SIGKILL)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(json.dumps({"codes": codes}), flush=True)
