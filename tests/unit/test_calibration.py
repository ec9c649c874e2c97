import pytest
import torch

from emloc_nb import CalibrationStats, EmlocError, collect_stats
from emloc_nb.structure import block_linears, model_inputs
from emloc_nb.tokens import batches, collator_for, encode_example


def _manual_second_moment(model, batch, layer):
    captured = []
    handle = dict(model.named_modules())[layer].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(**model_inputs(model, batch))
    handle.remove()
    x = captured[0][batch["attention_mask"].bool()].double()
    return x.T @ x


def test_second_moment_matches_real_tokens(tiny, toy_task):
    model, tok = tiny
    calib = batches(tok, toy_task.train, batch_size=4, limit=8)
    stats = collect_stats(model, calib, progress=False)
    layer = next(iter(block_linears(model)))
    expected = sum(_manual_second_moment(model, b, layer) for b in calib)
    # float32 products per batch, float64 sums across batches: agreement to float32 precision
    assert torch.allclose(stats.layer(layer).second_moment, expected, rtol=1e-5, atol=1e-6 * expected.abs().max())
    assert stats.layer(layer).tokens == sum(int(b["attention_mask"].sum()) for b in calib)


def test_wide_inputs_are_summed_a_slab_of_columns_at_a_time_upper_triangle_only(llama, toy_task, monkeypatch):
    from emloc_nb import calibration

    calib = batches(llama[1], toy_task.train, batch_size=4, limit=8)
    whole = collect_stats(llama[0], calib, progress=False)
    monkeypatch.setattr(calibration, "_SLAB", 5)  # narrower than every input: several slabs each, one ragged
    slabs = collect_stats(llama[0], calib, progress=False)
    for key, s in whole.inputs.items():
        assert s.second_moment.shape[1] > 5
        # the same float32 dot products, blocked differently: agreement to float32 precision
        scale = float(s.second_moment.abs().max())
        torch.testing.assert_close(slabs.inputs[key].second_moment, s.second_moment, rtol=1e-5, atol=1e-6 * scale)
        assert torch.equal(slabs.inputs[key].second_moment, slabs.inputs[key].second_moment.T)  # mirrored exactly


def test_shared_inputs_are_collected_once(llama, toy_task):
    model, tok = llama
    stats = collect_stats(model, batches(tok, toy_task.train, batch_size=8, limit=16), progress=False)
    for block in range(2):
        attn, mlp = f"model.layers.{block}.self_attn", f"model.layers.{block}.mlp"
        assert stats.inputs[f"{attn}.q_proj"].layers == [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]
        assert stats.inputs[f"{mlp}.gate_proj"].layers == [f"{mlp}.gate_proj", f"{mlp}.up_proj"]
        assert stats.key_for(f"{attn}.v_proj") == f"{attn}.q_proj"
    assert len(stats.inputs) == 4 * 2  # q/k/v, o, gate/up, down per block
    assert sorted(stats.layers) == sorted(block_linears(model))


def test_padding_does_not_change_the_statistics(tiny):  # every family, including OPT's flattened MLP inputs
    model, tok = tiny
    collate = collator_for(tok)
    short = encode_example(tok, [{"role": "user", "content": "ok"}], "yes")
    long = encode_example(tok, [{"role": "user", "content": "a much longer prompt than the other"}], "no")
    apart = collect_stats(model, [collate([short]), collate([long])], progress=False)
    padded = collect_stats(model, [collate([short, long])], progress=False)
    for key in apart.inputs:
        a, p = apart.inputs[key], padded.inputs[key]
        assert a.tokens == p.tokens
        assert torch.allclose(a.second_moment, p.second_moment, rtol=1e-4, atol=1e-5 * a.second_moment.abs().max())
        assert torch.allclose(a.abs_max, p.abs_max, rtol=1e-4, atol=1e-6)
    assert {s.tokens for s in padded.inputs.values()} == {len(short["input_ids"]) + len(long["input_ids"])}


def test_hooks_are_removed_after_an_exception(llama, toy_task):
    model, tok = llama
    calib = batches(tok, toy_task.train, batch_size=4, limit=8)

    def broken_forward(m, batch):
        m(**model_inputs(m, batch))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_stats(model, calib, forward_fn=broken_forward, progress=False)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    collect_stats(model, calib, progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert not any(k.startswith("_emloc") for m in model.modules() for k in vars(m))


def test_empty_and_all_padding_calibration_are_refused(llama, toy_task):
    model, tok = llama
    with pytest.raises(EmlocError, match="calibration set is empty"):
        collect_stats(model, [], progress=False)
    batch = batches(tok, toy_task.train, batch_size=4, limit=4)[0]
    batch = {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}
    with pytest.raises(EmlocError, match="padding"):
        collect_stats(model, [batch], progress=False)


def test_non_finite_activations_name_the_layer(llama, toy_task):
    model, tok = llama
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(EmlocError, match=r"Non-finite activations.*layers\.0\.self_attn\.q_proj.*float32"):
        collect_stats(model, batches(tok, toy_task.train, batch_size=4, limit=4), progress=False)


def test_save_load_round_trip_is_exact(calibrated, tmp_path):
    *_, stats = calibrated
    stats.save(tmp_path / "calib")
    loaded = CalibrationStats.load(tmp_path / "calib")
    assert loaded.model_fingerprint == stats.model_fingerprint and loaded.examples == stats.examples
    for key, s in stats.inputs.items():
        back = loaded.inputs[key]
        assert torch.equal(back.second_moment, s.second_moment) and torch.equal(back.abs_max, s.abs_max)
        assert back.layers == s.layers and back.tokens == s.tokens
    with pytest.raises(EmlocError, match="not empty"):
        stats.save(tmp_path / "calib")
    summary = loaded.rows
    assert len(summary) == len(stats.inputs) and summary[0]["tokens"] == stats.tokens
    assert (loaded.inputs[summary[0]["input"]].eigenvalues() >= 0).all()


def test_loaded_statistics_are_read_one_input_at_a_time(calibrated, tmp_path, monkeypatch):
    *_, stats = calibrated
    stats.save(tmp_path / "calib")
    loaded = CalibrationStats.load(tmp_path / "calib")
    reads = []
    read = type(loaded.inputs.groups).__getitem__
    monkeypatch.setattr(type(loaded.inputs.groups), "__getitem__", lambda self, k: reads.append(k) or read(self, k))
    # Looking layers up reads no tensors; a layer's statistics read only its own input, afresh each time.
    layer = stats.layers[-1]
    assert loaded.layers == stats.layers and loaded.tokens == stats.tokens and reads == []
    assert loaded.key_for(layer) == stats.key_for(layer) and reads == []
    first, again = loaded.layer(layer), loaded.layer(layer)
    assert reads == [stats.key_for(layer)] * 2 and first.second_moment is not again.second_moment
    assert torch.equal(first.second_moment, stats.layer(layer).second_moment)
    # A file rewritten after the load is refused, not read as if it were the one verified.
    stats.save(tmp_path / "calib", overwrite=True)
    with pytest.raises(EmlocError, match="changed after it was opened.*Load the report again"):
        loaded.layer(layer)
