"""Faults: SIGKILL during every stage, two writers at once, a parent killed under its stage child, no network.

Each leaves a run that either resumes to the same result as an uninterrupted run or
refuses with a one-line message. The pipelines are `emloc run --in-process` on the tiny
model, each in its own process (forked from tests/unit/_forker.py, which has imported
everything once), killed with SIGKILL at injected points (EMLOC_FAULT: the Nth atomic
commit inside a stage, or a training step) and after a random delay. Every one of these
processes has its sockets refused and counted: the pipeline never uses the network.
"""

from __future__ import annotations

import encodings.utf_8_sig  # noqa: F401  (imported before a child drops to the user nobody, who cannot read it)
import hashlib
import json
import os
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import torch
import yaml

from emloc_nb import EmlocError
from emloc_nb.artifacts import MANIFEST, verify_manifest
from emloc_nb.atomic import is_leftover
from emloc_nb.cli import main as cli_main
from emloc_nb.layout import ADAPTERS
from emloc_nb.lazy import resolve
from emloc_nb.run import Run
from emloc_nb.runlock import run_lock
from emloc_nb.stages import STAGES

from ..conftest import tiny_run_config


class Forker:
    """Runs `emloc ARGV` jobs as forked processes of tests/unit/_forker.py (see its docstring)."""

    def __init__(self, logs: Path):
        self.logs, self.count = logs, 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("EMLOC_FAULT", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_forker.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, *jobs: dict) -> list[tuple[int, str]]:
        """(exit code, output) of each job, run at the same time; -9 is a SIGKILL."""
        for job in jobs:
            self.count += 1
            job["log"] = str(self.logs / f"job{self.count}.log")
            job["argv"] = [str(a) for a in job.get("argv", [])]
        self.proc.stdin.write(json.dumps({"jobs": list(jobs)}) + "\n")
        self.proc.stdin.flush()
        codes = json.loads(self.proc.stdout.readline())["codes"]
        return [(code, Path(job["log"]).read_text()) for code, job in zip(codes, jobs)]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    f = Forker(tmp_path_factory.mktemp("logs"))
    yield f
    f.close()


def _config(tiny_files, tmp_path, name="c.yaml", **overrides) -> Path:
    _, model, data = tiny_files
    train = {"steps": 3, "batch_size": 8, "lr": 0.01, "checkpoint_every": 1}  # a checkpoint after every step
    config = tiny_run_config(model, data, train=train, **overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _outcome(run_dir: Path) -> dict:
    """What a finished run computed: the results rows and the bytes of every adapter."""
    run = Run(run_dir)
    rows = [{k: r[k] for k in ("setting", "accuracy", "answer_loss", "examples")} for r in run.results()]
    adapters = {
        which: hashlib.sha256((run.adapter_dir(which) / "adapter_model.safetensors").read_bytes()).hexdigest()
        for which in ADAPTERS
    }
    return {"rows": rows, "adapters": adapters}


def _assert_consistent(run_dir: Path) -> None:
    """Every artifact of the run is there, written by this run's stages, and matches its checksums."""
    run = Run(run_dir)
    for stage in STAGES.values():
        assert stage.done(run), stage.name
        for artifact in stage.reads:
            run.verify(artifact)
    leftovers = [p for p in run_dir.rglob(".*") if p.name != ".lock"]
    assert not leftovers, leftovers


def _one_line_error(stderr: str, pattern: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in stderr


class Reference(NamedTuple):
    config: Path
    run: Path
    outcome: dict
    seconds: float  # how long the uninterrupted run took on this machine


@pytest.fixture(scope="module")
def reference(forker, tiny_files, tmp_path_factory):
    """An uninterrupted run, with the network blocked: it does not try the network once."""
    tmp = tmp_path_factory.mktemp("reference")
    config = _config(tiny_files, tmp)
    started = time.time()
    [(code, log)] = forker.run({"argv": ["run", config, "--run-dir", tmp / "run", "--in-process"]})
    seconds = time.time() - started
    assert code == 0, log[-3000:]
    assert "network attempts: 0" in log
    return Reference(config, tmp / "run", _outcome(tmp / "run"), seconds)


def test_the_whole_pipeline_runs_with_the_network_blocked_and_a_deleted_file_is_a_clear_error(
    forker, reference, tmp_path
):
    _, reference_run, _, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "correct" / "adapter" / "adapter_model.safetensors").unlink()
    shutil.rmtree(run / "evaluate")
    before = sorted(p.relative_to(run) for p in run.rglob("*") if p.name != ".lock")
    adapter = run / "correct" / "adapter"
    api = (  # the API: load_adapter checks the weights file itself, before peft could look the path up on the Hub
        "from emloc_nb import load_adapter, tiny_model, EmlocError\n"
        f"try: load_adapter(tiny_model('llama')[0], {str(adapter)!r})\n"
        "except EmlocError as e: print('refused:', e)\n"
    )
    [(cli_code, cli_log), (api_code, api_log)] = forker.run(
        {"argv": ["evaluate", "--run-dir", run, "--in-process"]}, {"code": api}
    )
    assert cli_code == 1
    _one_line_error(
        cli_log.replace("network attempts: 0", ""), r"correct/adapter lacks \['adapter_model\.safetensors'\]"
    )
    assert "network attempts: 0" in cli_log
    assert api_code == 0 and "refused:" in api_log and "adapter_model.safetensors is missing" in api_log, api_log
    assert "network attempts: 0" in api_log
    assert sorted(p.relative_to(run) for p in run.rglob("*") if p.name != ".lock") == before


# Kill points: the Nth atomic commit inside a stage (before its rename), a training step, and then a random moment.
KILLS = [
    "commit:1@calibrate",
    "commit:2@calibrate",
    "commit:1@emulator",  # the spectra, inside the emulator's temporary directory
    "commit:2@emulator",
    "commit:1@drift",
    "train-step:2@finetune_emulator",  # after the checkpoint of step 1
    "commit:4@finetune_emulator",  # history.json written, the adapter not yet
    "commit:2@finetune_original",
    "commit:1@correct",
    "commit:2@correct",
    "commit:3@evaluate",
    "commit:14@evaluate",  # the results table
]


def test_sigkill_during_every_stage_resumes_to_the_same_result(forker, reference, tmp_path):
    config, _, expected, _ = reference
    run = tmp_path / "run"
    argv = ["run", config, "--run-dir", run, "--in-process"]
    killed_in = []
    for fault in KILLS:
        [(code, log)] = forker.run({"argv": argv, "fault": fault})
        assert code == -signal.SIGKILL, (fault, log[-3000:])
        killed_in.append(_running_stage(run))
    [(code, log)] = forker.run({"argv": argv})
    assert code == 0, log[-3000:]
    assert "network attempts: 0" in log
    assert [f.split("@")[1] for f in KILLS] == killed_in  # each kill landed in the stage it aimed at
    _assert_consistent(run)
    assert _outcome(run) == expected
    print(f"kills survived at injected points: {len(killed_in)} ({', '.join(killed_in)})")


def test_sigkill_at_random_moments_resumes_to_the_same_result(forker, reference, tmp_path):
    config, _, expected, seconds = reference
    run = tmp_path / "run"
    argv = ["run", config, "--run-dir", run, "--in-process"]
    rng, killed_in = random.Random(1), []
    for _ in range(30):
        # A share of the uninterrupted run's time, so the kills land inside the pipeline on a fast machine too.
        [(code, log)] = forker.run({"argv": argv, "kill_after": rng.uniform(0.05, 0.45) * seconds})
        if code == 0:
            break
        assert code == -signal.SIGKILL, log[-3000:]
        killed_in.append(_running_stage(run))
    else:
        pytest.fail("the run never finished")
    assert len(killed_in) >= 3
    _assert_consistent(run)
    assert _outcome(run) == expected
    print(f"kills survived at random moments: {len(killed_in)} ({', '.join(killed_in)})")


def _running_stage(run_dir: Path) -> str:
    """The first stage that had not finished when the process died."""
    if not (run_dir / "run.json").is_file():
        return "start"
    run = Run(run_dir)
    return next((name for name, stage in STAGES.items() if not stage.done(run)), "finished")


@pytest.mark.parametrize("second_starts_after", [0.0, 1.0, 3.0])
def test_two_writers_at_once_leave_one_consistent_run(forker, reference, tiny_files, tmp_path, second_starts_after):
    """Two `emloc run --overwrite` with different configs (ρ = 0.5 and 0.9) into one directory, at the same time."""
    config_a, _, expected, _ = reference
    config_b = _config(tiny_files, tmp_path, "b.yaml", emulator={"plan": {"ratio": 0.9}})
    run = tmp_path / "run"
    outcomes = forker.run(
        {"argv": ["run", config_a, "--run-dir", run, "--in-process", "--overwrite"]},
        {
            "argv": ["run", config_b, "--run-dir", run, "--in-process", "--overwrite"],
            "start_after": second_starts_after,
        },
    )
    print("two writers:", [(code, [x for x in log.splitlines() if x.startswith("error")]) for code, log in outcomes])
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 0], [0, 1]), outcomes
    for code, log in outcomes:
        if code == 1:
            errors = [line for line in log.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and "Traceback" not in log, log[-2000:]
            assert re.search(
                r"Another emloc process \(pid \d+\) is writing|changed since this Run was opened", errors[0]
            )
    _assert_consistent(run)  # whichever run won, every artifact in the directory belongs to it
    final = Run(run).config
    assert final.emulator.plan["ratio"] in (0.5, 0.9)
    if final.emulator.plan["ratio"] == 0.5:
        assert _outcome(run) == expected


def test_a_stage_child_dies_with_its_parent_and_the_run_resumes(forker, reference, tmp_path):
    config, reference_run, expected, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run, ignore=shutil.ignore_patterns(".lock"))
    for name in ("finetune_emulator", "correct", "evaluate"):
        shutil.rmtree(run / name)
    # Not --in-process: the stage runs in a child process of this `emloc finetune`.
    parent = subprocess.Popen([sys.executable, "-m", "emloc_nb.cli", "finetune", "--run-dir", str(run)])
    child, deadline = None, time.time() + 120
    while child is None and time.time() < deadline:
        children = psutil.Process(parent.pid).children(recursive=True)
        child = children[0] if children else None
        time.sleep(0.05)
    assert child is not None, "the stage child never started"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, _ = psutil.wait_procs([child], timeout=5)
    assert child in gone, "the stage child outlived its parent"
    [(code, log)] = forker.run({"argv": ["run", config, "--run-dir", run, "--in-process"]})
    assert code == 0, log[-3000:]
    _assert_consistent(run)
    assert _outcome(run) == expected


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from emloc_nb.runlock import run_lock\n"
            f"with run_lock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(EmlocError, match=rf"Another emloc process \(pid {holder.pid}\) is writing to .*Wait"),
            run_lock(tmp_path),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # a dead holder's lock is gone with it
        pass


def test_a_writer_that_loses_the_race_still_names_the_holder(tmp_path):
    """The holder takes the lock before it writes its pid; the refused writer waits for the pid, not a blank."""
    import fcntl
    import threading

    from emloc_nb.runlock import LOCK_FILE

    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # a second open file: flock conflicts in-process
    fcntl.flock(fd, fcntl.LOCK_EX)
    late = threading.Timer(0.2, os.pwrite, (fd, str(os.getpid()).encode(), 0))
    late.start()
    try:
        with (
            pytest.raises(EmlocError, match=rf"Another emloc process \(pid {os.getpid()}\) is writing"),
            run_lock(tmp_path),
        ):
            pass
    finally:
        late.join()
        os.close(fd)


# ----------------------------------------------------------------------------- issue 30: more faults
# SIGINT and SIGTERM during every stage, a full disk, two identical runs at once: each stops with one line, leaves
# nothing half-written (no temporary, every artifact there complete and as its manifest says) and resumes to the
# same result as an uninterrupted run.


def _error_line(log: str, pattern: str) -> None:
    """One `error:` line that names the problem (the rest of a job's log is its progress), and no traceback."""
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def _temporaries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if is_leftover(p.name)]


def _complete_so_far(run_dir: Path) -> None:
    """Nothing half-written: no temporary, and every artifact directory that is there matches its manifest."""
    assert not _temporaries(run_dir), _temporaries(run_dir)
    for manifest in run_dir.rglob(MANIFEST):
        verify_manifest(manifest.parent, kind=None)


@pytest.mark.parametrize("action, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_sigint_and_sigterm_during_every_stage_stop_cleanly_and_resume(forker, reference, tmp_path, action, code):
    config, _, expected, _ = reference
    run = tmp_path / "run"
    argv = ["run", config, "--run-dir", run, "--in-process"]
    stopped_in = []
    for fault in KILLS:
        [(got, log)] = forker.run({"argv": argv, "fault": fault, "action": action})
        assert got == code, (fault, log[-3000:])
        _error_line(log, rf"interrupted by {action}.*Rerun the same command")
        _complete_so_far(run)
        stopped_in.append(_running_stage(run))
    assert [f.split("@")[1] for f in KILLS] == stopped_in
    [(got, log)] = forker.run({"argv": argv})
    assert got == 0, log[-3000:]
    _assert_consistent(run)
    assert _outcome(run) == expected


def test_a_full_disk_in_every_stage_is_one_line_and_the_run_resumes(forker, reference, tmp_path):
    """ENOSPC where each stage writes (the write fails as on a full disk), then space again."""
    config, _, expected, _ = reference
    run = tmp_path / "run"
    argv = ["run", config, "--run-dir", run, "--in-process"]
    for fault in KILLS:
        [(got, log)] = forker.run({"argv": argv, "fault": fault, "action": "ENOSPC"})
        assert got == 1, (fault, log[-3000:])
        _error_line(log, r"No space left on device .*free space")
        _complete_so_far(run)
    [(got, log)] = forker.run({"argv": argv})
    assert got == 0, log[-3000:]
    _assert_consistent(run)
    assert _outcome(run) == expected


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_a_real_full_disk_a_small_tmpfs_then_more_space(forker, reference, tmp_path):
    config, reference_run, expected, _ = reference
    needed = sum(p.stat().st_size for p in reference_run.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, needed // 3):
        pytest.skip("mounting a tmpfs needs root (and mount); the simulated full disk above covers the same paths")
    try:
        run = disk / "run"
        argv = ["run", config, "--run-dir", run, "--in-process"]
        [(got, log)] = forker.run({"argv": argv})
        assert got == 1, log[-3000:]
        _error_line(log, r"No space left on device")
        _complete_so_far(run)
        stopped_in = _running_stage(run)
        subprocess.run(["mount", "-o", f"remount,size={needed * 3}", str(disk)], check=True)
        [(got, log)] = forker.run({"argv": argv})
        assert got == 0, log[-3000:]
        _assert_consistent(run)
        assert _outcome(run) == expected
        print(f"a tmpfs of {needed // 3} bytes filled up in the {stopped_in} stage; the run resumed with more space")
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_two_identical_runs_at_once_leave_one_consistent_run(forker, reference, tmp_path):
    config, _, expected, _ = reference
    run = tmp_path / "run"
    argv = ["run", config, "--run-dir", run, "--in-process"]
    outcomes = forker.run({"argv": argv}, {"argv": argv, "start_after": 0.5})
    for got, log in outcomes:
        assert got in (0, 1), log[-3000:]
        if got == 1:
            _error_line(log, r"Another emloc process \(pid \d+\) is writing")
    assert 0 in [got for got, _ in outcomes]
    _assert_consistent(run)
    assert _outcome(run) == expected


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_emloc_stops_its_stage_child_cleanly_and_the_run_resumes(forker, reference, tmp_path, sig):
    """Not --in-process: the signal reaches `emloc`, which stops its stage child; neither leaves a temporary."""
    config, reference_run, expected, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run, ignore=shutil.ignore_patterns(".lock"))
    for name in ("finetune_emulator", "correct", "evaluate"):
        shutil.rmtree(run / name)
    parent = subprocess.Popen(
        [sys.executable, "-m", "emloc_nb.cli", "finetune", "--run-dir", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child, deadline = None, time.time() + 120
    while child is None and time.time() < deadline:
        children = psutil.Process(parent.pid).children(recursive=True)
        child = children[0] if children else None
        time.sleep(0.05)
    assert child is not None, "the stage child never started"
    time.sleep(3)  # into the stage
    parent.send_signal(sig)
    out, err = parent.communicate(timeout=120)
    gone, _ = psutil.wait_procs([child], timeout=5)
    assert child in gone, "the stage child outlived its parent"
    assert parent.returncode in (128 + sig, 0), err[-2000:]  # 0: the stage had finished before the signal came
    if parent.returncode:
        _error_line(err, rf"interrupted by {sig.name}")
    assert "Traceback" not in out + err
    _complete_so_far(run)
    [(code, log)] = forker.run({"argv": ["run", config, "--run-dir", run, "--in-process"]})
    assert code == 0, log[-3000:]
    _assert_consistent(run)
    assert _outcome(run) == expected


def test_a_stage_directory_linked_outside_the_run_is_refused_and_left_alone(forker, reference, tiny_files, tmp_path):
    config, reference_run, _, _ = reference
    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(reference_run, run, ignore=shutil.ignore_patterns(".lock"))
    outside.mkdir()
    shutil.move(run / "emulator", outside / "emulator")
    (run / "emulator").symlink_to(outside / "emulator")
    before = _tree(outside)
    other = _config(tiny_files, tmp_path, "b.yaml", emulator={"plan": {"ratio": 0.9}})
    for argv, pattern in (
        (["run", config, "--run-dir", run, "--in-process"], r"emulator leads outside its run directory"),
        (["evaluate", "--run-dir", run, "--in-process"], r"emulator leads outside its run directory"),
        (["report", "--run-dir", run], r"emulator leads outside its run directory"),
        (["run", other, "--run-dir", run, "--in-process", "--overwrite"], r"holds \['emulator'\], which emloc-nb did"),
    ):
        [(code, log)] = forker.run({"argv": argv})
        assert code == 1, (argv, log[-3000:])
        _error_line(log, pattern)
        assert _tree(outside) == before
    assert (run / "emulator").is_symlink()


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
        if p.name != ".lock"
    }


def test_a_read_only_run_directory_as_another_user_is_refused_in_one_line_and_stays_readable(reference, tmp_path):
    """As `nobody` (a forked child that drops root): the run is read-only to it."""
    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root; as a non-root user, chmod alone makes the same case")
    _, reference_run, expected, _ = reference
    shared = Path(tempfile.mkdtemp(prefix="emloc-ro-", dir="/tmp"))  # pytest's tmp_path is private to root
    try:
        os.chmod(shared, 0o755)
        run = shared / "run"
        shutil.copytree(reference_run, run, ignore=shutil.ignore_patterns(".lock"))
        before = _tree(run)
        for path in [run, *run.rglob("*")]:
            os.chmod(path, 0o555 if path.is_dir() else 0o444)
        (shared / "out").mkdir(mode=0o777)
        os.chmod(shared / "out", 0o777)
        results = {}
        # Everything the report imports, imported as root first: this Python's stdlib may not be readable by nobody.
        resolve("emloc_nb.widgets.report:write_report")(reference_run, tmp_path / "warm.html")
        for name, argv in (
            ("evaluate", ["evaluate", "--run-dir", str(run), "--in-process"]),
            ("run", ["run", str(run / "run.json"), "--run-dir", str(run), "--in-process"]),
            ("report", ["report", "--run-dir", str(run), "--output", str(shared / "out" / "report.html")]),
        ):
            results[name] = _as_nobody(lambda argv=argv: cli_main(argv), shared / "out" / f"{name}.log")
        for name in ("evaluate", "run"):
            code, log = results[name]
            assert code == 1, log[-3000:]
            _error_line(log, r"run is not writable here \(Permission denied\).*Make it writable")
        code, log = results["report"]
        assert code == 0 and (shared / "out" / "report.html").is_file(), log[-3000:]
        code, log = _as_nobody(lambda: print(json.dumps(Run(run).results())) or 0, shared / "out" / "api.log")
        assert (
            code == 0
            and json.loads(log.strip().splitlines()[-1])
            == json.loads((reference_run / "evaluate" / "results.json").read_text())["rows"]
        )
        assert _tree(run) == before
    finally:
        for path in [shared, *shared.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        shutil.rmtree(shared)


def _as_nobody(call, log: Path, timeout: float = 600) -> tuple[int, str]:
    """(exit code, output) of `call()` in a forked child running as the user nobody.

    A fork, not a fresh interpreter: nobody may not be allowed to run this Python (here it lies under /root).
    """
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            # The parent's OpenMP threads do not exist in a fork, and MKL's next parallel region would wait for
            # them forever (eigvalsh in the report did): one thread takes no parallel region.
            torch.set_num_threads(1)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115 (not pytest's capture)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = call()
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 98)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child running as nobody still ran after {timeout} s; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return os.waitstatus_to_exitcode(done[1]), log.read_text()
