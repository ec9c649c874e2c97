"""Atomic writes, leftovers, the overwrite check at commit time, the run lock, manifests and trust_remote_code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from emloc_nb import EmlocError, RunConfig, atomic, serial
from emloc_nb import artifacts as A
from emloc_nb.run import Run

from ..conftest import tiny_run_config


def _write_dir(path: Path, value: int, **kwargs) -> None:
    with A.artifact_dir(path, **kwargs) if "kind" in kwargs else atomic.atomic_dir(path, **kwargs) as tmp:
        (tmp / "sub").mkdir()
        serial.write_json(tmp / "a.json", {"value": value})
        serial.write_json(tmp / "sub" / "b.json", {"value": value})


def test_files_and_directories_are_flushed_to_disk(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    _write_dir(tmp_path / "d", 1, kind="test")
    names = {Path(p).name for p in synced}
    # both files and the manifest, the temporary directory and its subdirectory, and the parent after the rename
    assert {"a.json", "b.json", "manifest.json", "sub", tmp_path.name} <= names


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_an_existing_artifact_is_exchanged_in_one_step_and_never_missing(tmp_path, monkeypatch):
    flags = []
    real = atomic._renameat2
    monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flag: flags.append(flag) or real(src, dst, flag))
    _write_dir(tmp_path / "d", 0)
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (tmp_path / "d" / "a.json").is_file():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for value in range(1, 40):
            _write_dir(tmp_path / "d", value, overwrite=True)
    finally:
        stop.set()
        watcher.join()
    assert flags[0] == atomic._RENAME_NOREPLACE and set(flags[1:]) == {atomic._RENAME_EXCHANGE}
    assert not missing
    assert serial.read_json(tmp_path / "d" / "a.json") == {"value": 39}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporaries left


def _killed_writer(tmp_path: Path, fault: str, *, renameat2: bool) -> None:
    """A process that overwrites tmp_path/d and is SIGKILLed at `fault`."""
    code = (
        "import sys; from emloc_nb.atomic import atomic_dir; from emloc_nb.serial import write_json\n"
        f"with atomic_dir({str(tmp_path / 'd')!r}, overwrite=True) as tmp:\n"
        "    write_json(tmp / 'a.json', {'value': 'new'})\n"
    )
    env = {**os.environ, "EMLOC_FAULT": fault}
    if not renameat2:
        env["EMLOC_NO_RENAMEAT2"] = "1"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert done.returncode == -9, done.stderr


def test_the_two_step_fallback_interrupted_between_its_renames_is_repaired(tmp_path):
    with atomic.atomic_dir(tmp_path / "d") as tmp:
        serial.write_json(tmp / "a.json", {"value": "old"})
    _killed_writer(tmp_path, "commit-between:1", renameat2=False)
    assert not (tmp_path / "d").exists()  # the window: the old one moved aside, the new one not yet in place
    (leftover,) = [p for p in tmp_path.iterdir() if ".d.old-" in p.name]
    (unfinished,) = [p for p in tmp_path.iterdir() if ".d.tmp-" in p.name]
    done = atomic.clean_leftovers(tmp_path)
    assert sorted(done) == [f"removed {unfinished}", f"restored {tmp_path / 'd'} from {leftover.name}"]
    assert serial.read_json(tmp_path / "d" / "a.json") == {"value": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_dead_writers_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    with atomic.atomic_dir(tmp_path / "d") as tmp:
        serial.write_json(tmp / "a.json", {"value": "old"})
    _killed_writer(tmp_path, "commit:1", renameat2=True)
    (dead,) = [p for p in tmp_path.iterdir() if ".d.tmp-" in p.name]
    live = tmp_path / f".d.tmp-{os.getpid()}-0000abcd"
    live.mkdir()
    with atomic.atomic_dir(tmp_path / "d", overwrite=True) as tmp:  # the next write of d cleans up after the dead one
        serial.write_json(tmp / "a.json", {"value": "newer"})
    assert not dead.exists() and live.exists()
    assert serial.read_json(tmp_path / "d" / "a.json") == {"value": "newer"}


def test_overwrite_false_is_checked_at_the_rename_so_a_competing_writer_is_not_replaced(tmp_path):
    with (
        pytest.raises(EmlocError, match="already exists and is not empty.*overwrite=True"),
        atomic.atomic_dir(tmp_path / "d") as first,
    ):
        serial.write_json(first / "a.json", {"by": "first"})
        _write_dir(tmp_path / "d", 2)  # another writer finishes in the meantime
    assert serial.read_json(tmp_path / "d" / "a.json") == {"value": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_manifest_records_checksums_versions_fingerprint_and_settings(tmp_path):
    _write_dir(tmp_path / "d", 1, kind="thing", model_fingerprint="abc", config={"clamp": math.inf})
    manifest = A.verify_manifest(tmp_path / "d", kind="thing", model_fingerprint="abc", config={"clamp": math.inf})
    assert set(manifest["files"]) == {"a.json", "sub/b.json"} and all(len(h) == 64 for h in manifest["files"].values())
    assert manifest["format_version"] == A.FORMAT_VERSION and manifest["package_version"] == A.package_version()
    with pytest.raises(EmlocError, match=r"produced by other settings \(clamp: inf there, 3\.0 here\)"):
        A.verify_manifest(tmp_path / "d", kind="thing", config={"clamp": 3.0})
    with pytest.raises(EmlocError, match="belongs to a model with fingerprint abc, not xyz"):
        A.verify_manifest(tmp_path / "d", kind="thing", model_fingerprint="xyz")
    (tmp_path / "d" / "sub" / "b.json").write_text('{"value": 2}')
    with pytest.raises(EmlocError, match=r"sub/b\.json does not match its SHA-256"):
        A.verify_manifest(tmp_path / "d", kind="thing")


def test_json_keeps_non_finite_floats_and_strings_apart(tmp_path):
    serial.write_json(tmp_path / "x.json", {"clamp": math.inf, "gap": math.nan, "answer": "nan", "word": "inf"})
    d = serial.read_json(tmp_path / "x.json")
    assert d["clamp"] == math.inf and math.isnan(d["gap"]) and d["answer"] == "nan" and d["word"] == "inf"


def test_no_clamp_round_trips_through_run_json(tiny_files, tmp_path):
    _, model, data = tiny_files
    run = Run(tmp_path / "run", tiny_run_config(model, data, correction={"clamp": math.inf}))
    assert Run(run.dir).config.correction.clamp == math.inf
    assert Run(run.dir).config.to_dict() == run.config.to_dict()
    legacy = json.loads((run.dir / "run.json").read_text())
    legacy["correction"]["clamp"] = "inf"  # how run.json spelt them before manifests
    legacy["trust_remote_code"] = False
    assert RunConfig.from_dict(legacy).correction.clamp == math.inf


def test_a_run_replaced_by_another_process_is_not_written_into(tiny_files, tmp_path):
    _, model, data = tiny_files
    first = Run(tmp_path / "run", tiny_run_config(model, data))
    Run(
        tmp_path / "run", tiny_run_config(model, data, correction={"clamp": 1.0}), overwrite=True
    )  # someone else, meanwhile
    with pytest.raises(EmlocError, match="run.json changed since this Run was opened.*Open the run again"):
        first.run_stage("calibrate", isolate=False)
    assert not (tmp_path / "run" / "calibrate").exists()


def test_overwrite_replaces_a_run_and_only_its_own_entries(tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.dir, run_dir)
    (run_dir / "scratch").mkdir()
    (run_dir / "scratch" / "plan.json").write_text("{}")
    config = tiny_run_config(Path(tiny_run.config.model), Path(tiny_run.config.task.source), correction={"clamp": 1.0})
    run = Run(run_dir, config, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "run.json"]
    assert run.config.correction.clamp == 1.0


def test_a_model_that_asks_for_its_own_code_does_not_run_it(tiny_files, tmp_path):
    """A known model type with auto_map loads transformers' own class; the module is never imported."""
    import shutil

    from emloc_nb import load_model

    _, model, _ = tiny_files
    remote = Path(shutil.copytree(model, tmp_path / "remote"))
    marker = tmp_path / "ran"
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (remote / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(remote)
    assert type(loaded).__module__.startswith("transformers.") and not marker.exists()


def test_the_callers_trust_remote_code_reaches_the_stage_child_and_nothing_else_does(tiny_files, tmp_path, monkeypatch):
    from emloc_nb import runner

    _, model, data = tiny_files
    launched = []

    class FakeChild:
        stdout, returncode = iter(()), 0

        def __init__(self, argv, **kwargs):
            launched.append(argv)

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", FakeChild)
    monkeypatch.setattr(Run, "stage_records", lambda self: {"calibrate": {"peak_rss_mb": 1.0}})
    for trusted in (False, True):
        run = Run(tmp_path / f"run{trusted}", tiny_run_config(model, data), trust_remote_code=trusted)
        with run.writing():
            runner._run_step(run, "calibrate", isolate=True)
        assert ("--trust-remote-code" in launched[-1]) is trusted
        assert "trust_remote_code" not in (run.dir / "run.json").read_text()
