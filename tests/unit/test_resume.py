"""Trust on resume: finished stages are checked again whenever a run resumes, results are tied to what produced them.

Every resume checks each finished artifact against its manifest (each file's size, and its blocks: all of a
small file, the first, last and some drawn at random of a large one); a loader, and anything a command reports
as a run's result, checks the full SHA-256. The refusals themselves are cases of tests/unit/test_bad_input.py;
here: what is recomputed instead of refused, the sampled check on a large file, and its cost.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from emloc_nb import EmlocError, stages
from emloc_nb import artifacts as A
from emloc_nb import run as run_module
from emloc_nb.cli import main as cli
from emloc_nb.eval_settings import SETTINGS, settings
from emloc_nb.results import results_markdown
from emloc_nb.run import Run
from emloc_nb.stages import STAGES

from ..conftest import tiny_run_config


@pytest.fixture
def finished(tiny_run, tmp_path) -> Path:
    """A copy of the finished tiny run."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run.dir, run, ignore=shutil.ignore_patterns(".lock"))
    return run


def _table(run: Path) -> list[dict]:
    return json.loads((run / "evaluate" / "results.json").read_text())["rows"]


@pytest.mark.parametrize(
    "edit, loader_refuses",
    [
        (lambda t: t["config"].update(seed=9), r"computed for other settings"),  # written for another config
        (lambda t: t.pop("inputs"), None),  # a table from before results named their evaluations
        (lambda t: t["inputs"].update({"evaluation:original": "0" * 16}), r"computed from other evaluations"),
        (lambda t: t["rows"][0].update(accuracy=0.999), r"its rows changed after they were written"),
    ],
    ids=["config", "no-inputs", "other-evaluation", "edited-row"],
)
def test_a_results_table_that_is_not_the_runs_is_recomputed_from_its_evaluations(
    finished, edit, loader_refuses, capsys
):
    expected = _table(finished)
    path = finished / "evaluate" / "results.json"
    table = json.loads(path.read_text())
    edit(table)
    path.write_text(json.dumps(table))
    if loader_refuses:
        with pytest.raises(EmlocError, match=loader_refuses):
            Run(finished).results()  # the loader refuses; `emloc evaluate` recomputes
    capsys.readouterr()
    assert cli(["evaluate", "--run-dir", str(finished), "--in-process"]) == 0
    out = capsys.readouterr().out
    assert _table(finished) == expected
    assert results_markdown(expected) in out
    assert Run(finished).results() == expected


def test_a_finished_run_resumes_with_nothing_to_do_and_checks_every_stage(finished, monkeypatch, capsys):
    """`emloc run` on a finished run: every stage is done, checked quickly; what it reports, in full."""
    checked: list[tuple[str, bool]] = []
    real = A.verify_manifest

    def recording(path, *args, quick=False, **kwargs):
        checked.append((Path(path).relative_to(finished).as_posix(), quick))
        return real(path, *args, quick=quick, **kwargs)

    for module in (stages, run_module):
        monkeypatch.setattr(module, "verify_manifest", recording)
    config = finished.parent / "config.json"
    config.write_text((finished / "run.json").read_text())
    assert cli(["run", str(config), "--run-dir", str(finished), "--in-process"]) == 0
    assert "[emloc]" not in capsys.readouterr().out  # no stage ran
    run = Run(finished)
    outputs = {run.path(a).relative_to(finished).as_posix() for s in STAGES.values() for a in s.outputs(run.config)}
    assert {p for p, quick in checked if quick} == outputs - {"evaluate/results.json"}
    assert ("correct/adapter", False) in checked  # the path it prints: in full
    assert {p for p, quick in checked if not quick} >= {f"evaluate/{s}" for s in settings(run.config)}


def _big_artifact(path: Path, mib: int = 40) -> Path:
    rng = random.Random(0)
    with A.artifact_dir(path, kind="big") as tmp:
        (tmp / "weights.bin").write_bytes(rng.randbytes(mib << 20))
        (tmp / "small.json").write_text('{"a": 1}')
    return path / "weights.bin"


def _flip(path: Path, at: int) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_large_file_is_checked_by_size_and_sampled_blocks_on_resume_and_in_full_when_loaded(tmp_path):
    weights = _big_artifact(tmp_path / "a")
    manifest = A.read_manifest(tmp_path / "a")
    blocks = manifest["blocks"]["files"]["weights.bin"]
    assert blocks["bytes"] == 40 << 20 and len(blocks["sha256"]) == 10
    A.verify_manifest(tmp_path / "a", kind="big", quick=True)

    for at in (100, weights.stat().st_size - 5):  # the header block and the last are read by every quick check
        _flip(weights, at)
        with pytest.raises(EmlocError, match=r"weights\.bin does not match its SHA-256"):
            A.verify_manifest(tmp_path / "a", kind="big", quick=True)
        _flip(weights, at)
    with weights.open("ab") as f:  # a size change, whatever the blocks drawn
        f.write(b"\0")
    with pytest.raises(EmlocError, match=r"weights\.bin does not match"):
        A.verify_manifest(tmp_path / "a", kind="big", quick=True)
    with weights.open("r+b") as f:
        f.truncate(40 << 20)

    _flip(weights, 5 * (4 << 20) + 123)  # inside a middle block: the full check always, quick ones by chance
    with pytest.raises(EmlocError, match=r"weights\.bin does not match"):
        A.verify_manifest(tmp_path / "a", kind="big")
    random.seed(0)
    caught = 0
    for _ in range(20):
        try:
            A.verify_manifest(tmp_path / "a", kind="big", quick=True)
        except EmlocError:
            caught += 1
    assert caught >= 10  # 6 of the 8 middle blocks per check: 3 in 4 resumes see it


def test_a_manifest_written_before_block_digests_is_checked_in_full(tmp_path):
    weights = _big_artifact(tmp_path / "a", mib=20)
    manifest = json.loads((tmp_path / "a" / A.MANIFEST).read_text())
    del manifest["blocks"]
    (tmp_path / "a" / A.MANIFEST).write_text(json.dumps(manifest))
    A.verify_manifest(tmp_path / "a", kind="big", quick=True)
    _flip(weights, 3 * (4 << 20) + 7)
    with pytest.raises(EmlocError, match=r"weights\.bin does not match"):
        A.verify_manifest(tmp_path / "a", kind="big", quick=True)


@pytest.mark.parametrize(
    "blocks",
    [[1], {"size": 7, "files": {}}, {"size": 4 << 20, "files": {"weights.bin": {"bytes": -1, "sha256": []}}}],
)
def test_malformed_block_records_are_refused(tmp_path, blocks):
    _big_artifact(tmp_path / "a", mib=1)
    manifest = json.loads((tmp_path / "a" / A.MANIFEST).read_text())
    manifest["blocks"] = blocks
    (tmp_path / "a" / A.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EmlocError, match=r"records its blocks malformed"):
        A.verify_manifest(tmp_path / "a", kind="big", quick=True)


def test_the_quick_check_reads_a_fixed_number_of_blocks_of_a_large_file(tmp_path, monkeypatch):
    _big_artifact(tmp_path / "a", mib=64)
    A.verify_manifest(tmp_path / "a", kind="big")  # the file in the page cache for both
    hashed, timings = {}, {}
    real = A.hashlib.sha256

    def counting(data=b""):
        hashed[mode] += len(data)
        h = real(data)
        return type("H", (), {"update": lambda self, b: hashed.__setitem__(mode, hashed[mode] + len(b)) or h.update(b),
                              "hexdigest": lambda self: h.hexdigest()})()  # fmt: skip

    monkeypatch.setattr(A.hashlib, "sha256", counting)
    for mode in ("full", "quick"):
        hashed[mode] = 0
        started = time.perf_counter()
        A.verify_manifest(tmp_path / "a", kind="big", quick=mode == "quick")
        timings[mode] = time.perf_counter() - started
    print(f"64 MiB artifact: full check {timings['full'] * 1000:.0f} ms, quick {timings['quick'] * 1000:.0f} ms")
    assert hashed["full"] >= 64 << 20
    assert hashed["quick"] <= (A.QUICK_SAMPLES + 2) * A.BLOCK + 1024  # first, last, six drawn; and small.json


def test_one_error_for_a_missing_manifest_from_verify_and_every_loader(finished):
    """The same EmlocError, word for word, from Run.verify and from the loader: for the loaded artifact's own
    manifest and for each of its inputs' (a loader checks that it was computed from the inputs the run holds)."""
    loaders = {
        "calibration:train": lambda run: run.calibration("train"),
        "calibration:heldout": lambda run: run.calibration("heldout"),
        "emulator": lambda run: run.emulator(),
        "spectra": lambda run: run.spectra(),
        "drift": lambda run: run.drift(),
        "adapter:emulator": lambda run: run.adapter_dir("emulator"),
        "adapter:original": lambda run: run.adapter_dir("original"),
        "corrected_adapter": lambda run: run.adapter_dir("corrected"),
        "correction": lambda run: run.correction(),
        **{f"evaluation:{s}": (lambda run, s=s: run.eval_result(s)) for s in SETTINGS},
    }
    cases = 0
    for artifact, load in loaders.items():
        stage, part = stages._writer(artifact)
        for victim in (artifact, *stage.inputs(part)):
            run = Run(finished)
            manifest = run.path(victim) / A.MANIFEST
            saved = manifest.read_bytes()
            manifest.unlink()
            try:
                with pytest.raises(EmlocError) as by_verify:
                    run.verify(victim)
                with pytest.raises(EmlocError) as by_loader:
                    load(run)
                assert str(by_loader.value) == str(by_verify.value), (artifact, victim)
                assert "has no manifest.json" in str(by_verify.value), (artifact, victim)
                cases += 1
            finally:
                manifest.write_bytes(saved)
    assert cases >= 30


def test_one_part_of_a_stage_runs_alone(tiny_files, tmp_path):
    """run_stage(part=...): one evaluation, without the stages the others need; a part that is not one is refused."""
    root, model, data = tiny_files
    run = Run(tmp_path / "run", tiny_run_config(model, data))
    run.run_stage("evaluate", part="original", isolate=False)
    assert run.has("evaluation:original") and not run.has("emulator") and not run.has("results")
    with pytest.raises(EmlocError, match="has no part 'nope'"):
        run.run_stage("evaluate", part="nope", isolate=False)
    with pytest.raises(EmlocError, match="has no part"):
        run.run_stage("emulator", part="original", isolate=False)
