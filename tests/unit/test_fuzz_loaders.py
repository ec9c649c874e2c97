"""hypothesis fuzzes the artifact loaders: each damaged artifact loads or is refused with an EmlocError, never a crash.

The damage is written with a matching manifest (as a hostile sender would), so that the
parsers themselves are exercised, not only the checksums. Each target is bounded by
max_examples, so the whole file stays well under a minute.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest

# hypothesis is in the test extra; an environment set up before it was added skips this file rather than fail.
pytest.importorskip("hypothesis", reason="hypothesis is in the test extra: pip install -e '.[test]'")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emloc_nb import EmlocError, RunConfig
from emloc_nb import artifacts as A
from emloc_nb.lora import load_adapter
from emloc_nb.provenance import provenance
from emloc_nb.reports import Report

from .test_reports import _reports

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw, original: dict):
    """`original` with some keys deleted, some values replaced by random JSON, and maybe a stray key."""
    d = json.loads(json.dumps(original))
    keys = sorted(d)
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)) if keys else []:
        if draw(st.booleans()):
            del d[key]
        else:
            d[key] = draw(json_values)
    if draw(st.booleans()):
        d[draw(st.text(max_size=8))] = draw(json_values)
    return d


def _resign(directory: Path) -> None:
    """Rewrite the manifest so that its checksums match the damaged files."""
    manifest = json.loads((directory / A.MANIFEST).read_text())
    (directory / A.MANIFEST).unlink()
    token = provenance.set(manifest.get("run"))
    try:
        A.write_manifest(
            directory, kind=manifest["kind"], model_fingerprint=manifest["model_fingerprint"], config=manifest["config"]
        )
    finally:
        provenance.reset(token)


def _loads_or_refuses(load) -> None:
    try:
        load()
    except EmlocError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def saved_reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    return {type(r): r.save(root / r.kind) for r in _reports()}


def _copy(path: Path) -> Path:
    target = Path(tempfile.mkdtemp()) / path.name
    shutil.copytree(path, target)
    return target


@pytest.mark.parametrize("kind", [type(r) for r in _reports()], ids=lambda k: k.__name__)
@FUZZ
@given(data=st.data())
def test_report_metadata(saved_reports, kind: type[Report], data):
    path = _copy(saved_reports[kind])
    meta_file = path / f"{kind.kind}.json"
    original = json.loads(meta_file.read_text())
    damaged = data.draw(json_values | mutated(original))
    meta_file.write_text(json.dumps(damaged))
    _resign(path)
    _loads_or_refuses(lambda: kind.load(path))
    shutil.rmtree(path.parent)


def _safetensors(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


tensor_headers = st.dictionaries(
    st.text(max_size=12),
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F64", "I64", "BOOL", "F16", "X9"]) | json_values,
            "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
            "data_offsets": st.lists(st.integers(-4, 80), min_size=2, max_size=2) | json_values,
        }
    ),
    max_size=3,
)


@FUZZ
@given(
    header=tensor_headers.map(lambda h: json.dumps(h).encode()) | st.binary(max_size=64),
    body=st.binary(max_size=96),
    raw=st.booleans(),
)
def test_safetensors_headers(saved_reports, header, body, raw):
    kind = type(_reports()[0])  # CalibrationStats: its tensors are read back into per-input statistics
    path = _copy(saved_reports[kind])
    (path / f"{kind.kind}.safetensors").write_bytes(body if raw else _safetensors(header, body))
    _resign(path)
    _loads_or_refuses(lambda: kind.load(path))
    shutil.rmtree(path.parent)


@FUZZ
@given(data=st.data())
def test_manifests(saved_reports, data):
    kind = type(_reports()[2])
    path = _copy(saved_reports[kind])
    original = json.loads((path / A.MANIFEST).read_text())
    (path / A.MANIFEST).write_text(json.dumps(data.draw(json_values | mutated(original))))
    _loads_or_refuses(lambda: A.verify_manifest(path, kind=kind.kind))
    _loads_or_refuses(lambda: kind.load(path))
    shutil.rmtree(path.parent)


@FUZZ
@given(d=json_values | mutated(RunConfig().to_dict()))
def test_run_configs(d):
    _loads_or_refuses(lambda: RunConfig.from_dict(d))


@pytest.fixture(scope="module")
def adapter(tiny_run):
    return tiny_run.original()[0], tiny_run.adapter_dir("corrected")


@FUZZ
@given(data=st.data())
def test_adapter_configs(adapter, data):
    model, source = adapter
    path = _copy(source)
    config_file = path / "adapter_config.json"
    config_file.write_text(json.dumps(data.draw(mutated(json.loads(config_file.read_text())))))
    _resign(path)
    try:
        load_adapter(model, path).unload()
    except EmlocError as e:
        assert "\n" not in str(e)
    assert not any("lora" in n for n, _ in model.named_modules())  # a refused adapter leaves the model as it was
    shutil.rmtree(path.parent)


@pytest.fixture(scope="module")
def emulator_dir(tiny_run):
    return tiny_run.path("emulator")


@FUZZ
@given(data=st.data())
def test_emulator_metadata(emulator_dir, data):
    from emloc_nb.emulator import Emulator

    path = _copy(emulator_dir)
    meta_file = path / "emulator.json"
    meta_file.write_text(json.dumps(data.draw(mutated(json.loads(meta_file.read_text())))))
    _resign(path)
    _loads_or_refuses(lambda: Emulator.load(path))
    shutil.rmtree(path.parent)
