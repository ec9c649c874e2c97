import pytest
import torch

from emloc_nb import EmlocError, Emulator, Run, build_emulator, collect_stats, fingerprint, load_model, tiny_model
from emloc_nb.streaming import build_streaming, stream
from emloc_nb.tokens import batches

from ..conftest import tiny_run_config


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def sharded(request, tmp_path_factory):
    """A tiny model saved in several safetensors shards, and the same model loaded whole."""
    root = tmp_path_factory.mktemp(f"sharded-{request.param}")
    model, tok = tiny_model(request.param, layers=3)
    model.save_pretrained(root / "ckpt", max_shard_size="100KB")
    tok.save_pretrained(root / "ckpt")
    assert len(list((root / "ckpt").glob("model-*.safetensors"))) > 3
    return root, load_model(root / "ckpt")


def test_the_streamed_emulator_equals_the_in_memory_one(sharded, toy_task):
    root, (model, tok) = sharded
    calib = batches(tok, toy_task.train, batch_size=8, limit=32)
    stats = collect_stats(model, calib, progress=False)
    whole = build_emulator(model, stats, 0.5, progress=False)
    streamed_stats = stream(
        root / "ckpt", batch_sets={"train": calib}, output=root / "streamed", plan=0.5, overwrite=True, progress=False
    )["train"]
    streamed = Emulator.load(root / "streamed")

    assert streamed_stats.model_fingerprint == stats.model_fingerprint == fingerprint(model)
    assert list(streamed_stats.inputs) == list(stats.inputs)
    for key, s in stats.inputs.items():
        t = streamed_stats.inputs[key]
        assert t.layers == s.layers and t.tokens == s.tokens
        assert torch.allclose(t.second_moment, s.second_moment, rtol=1e-6, atol=1e-8)
    a, b = whole.model.state_dict(), streamed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert streamed.ranks == whole.ranks and streamed.original_fingerprint == whole.original_fingerprint
    assert streamed.fingerprint == whole.fingerprint
    for r, s in zip(whole.spectra.rows, streamed.spectra.rows):
        assert r["name"] == s["name"] and r["predicted_error"] == pytest.approx(s["predicted_error"], rel=1e-6)
    assert len(list((root / "streamed").glob("emulator-*.safetensors"))) == 4  # the outer tensors, then a block each
    # the one-pass build that drops each block's statistics builds the same emulator up to rounding (its
    # statistics are summed a sequence at a time, the SVDs run in float32) and the signs of singular vectors.
    # Its layers wider in than out are factored from their outputs' moments, which need no Cholesky factor and
    # so none of its larger jitter (the first block's rank-deficient input needs it: its tail is lifted).
    lean = build_streaming(root / "ckpt", calib, 0.5, root / "lean", overwrite=True, progress=False)
    assert lean.ranks == whole.ranks and lean.calibration == whole.calibration
    by_output = {r["name"] for r in lean.spectra.rows if r["whitening"] == "output moment"}
    assert by_output == {r["name"] for r in whole.spectra.rows if r["d_in"] > r["d_out"]}
    assert any(n.endswith("down_proj") for n in by_output)
    modules = dict(lean.model.named_modules())
    for r, s in zip(whole.spectra.rows, lean.spectra.rows):
        name = r["name"]
        dense = whole.model.get_submodule(name).dense_weight().detach()
        gap = modules[name].dense_weight().detach() - dense
        assert float(gap.abs().max()) < 1e-3 * float(dense.abs().max()), name
        assert s["name"] == name and s["predicted_error"] == pytest.approx(r["predicted_error"], rel=1e-3)
        kept = r["rank"] if r["whitening"] != "cholesky" else None
        sv_whole, sv_lean = (x.spectra[name]["whitened"][:kept] for x in (whole.spectra, lean.spectra))
        assert torch.allclose(sv_whole, sv_lean, rtol=0, atol=1e-3 * float(sv_whole[0])), name
    # the streamed emulator is a normal one: it runs and checks against its original
    Emulator.load(root / "streamed", original=model)
    out = streamed.model(input_ids=calib[0]["input_ids"], attention_mask=calib[0]["attention_mask"]).logits
    assert torch.allclose(
        out, whole.model(input_ids=calib[0]["input_ids"], attention_mask=calib[0]["attention_mask"]).logits, atol=1e-4
    )


def test_a_streamed_build_frees_each_block_before_loading_the_next(sharded, toy_task, tmp_path, monkeypatch):
    import gc
    import weakref

    from emloc_nb import streaming

    root, (model, tok) = sharded
    factored, alive_at_each_read = [], []
    factor_layer, tensors = streaming.factor_layer, streaming.Checkpoint.tensors

    def spy_factor_layer(name, module, *args, **kwargs):
        factored.append(weakref.ref(module.weight))  # the original's loaded weight
        return factor_layer(name, module, *args, **kwargs)

    def spy_tensors(self, names, **kwargs):
        gc.collect()
        alive_at_each_read.append(sum(w() is not None and not w().is_meta for w in factored))
        return tensors(self, names, **kwargs)

    monkeypatch.setattr(streaming, "factor_layer", spy_factor_layer)
    monkeypatch.setattr(streaming.Checkpoint, "tensors", spy_tensors)
    calib = batches(tok, toy_task.train, batch_size=8, limit=16)
    build_streaming(root / "ckpt", calib, 0.5, tmp_path / "emulator", progress=False)
    # the outer tensors, then one read per block: no weight of an earlier block is still held
    assert len(alive_at_each_read) == 4 and len(factored) > 0 and alive_at_each_read == [0, 0, 0, 0]


def test_a_streamed_build_from_saved_statistics_checks_they_belong_to_the_checkpoint(sharded, toy_task, tmp_path):
    root, (model, tok) = sharded
    calib = batches(tok, toy_task.train, batch_size=8, limit=16)
    other, _ = tiny_model("llama", seed=5, layers=3)
    with pytest.raises(EmlocError, match="Calibrate this checkpoint"):
        stream(root / "ckpt", stats=collect_stats(other, calib, progress=False), output=tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()
    with pytest.raises(EmlocError, match="needs statistics"):
        stream(root / "ckpt", output=tmp_path / "e", progress=False)


def test_a_gguf_or_a_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(EmlocError, match="GGUF"):
        stream(tmp_path / "m.gguf", batch_sets={"train": []})
    model, _ = tiny_model("llama")
    model.config.save_pretrained(tmp_path / "bare")
    with pytest.raises(EmlocError, match="model.safetensors"):
        stream(tmp_path / "bare", batch_sets={"train": []})


def test_the_pipeline_streams_when_asked_and_builds_the_same_emulator(tiny_files):
    root, model, data = tiny_files
    whole = Run(root / "whole", tiny_run_config(model, data, baseline=False))
    whole.run_all(isolate=False, until="emulator")
    config = tiny_run_config(model, data, baseline=False)
    config.emulator.streaming = True
    streamed = Run(root / "streamed", config)
    streamed.run_all(isolate=False, until="emulator")
    assert not any(k.startswith("original") for k in streamed._cache)  # the whole original was never loaded
    for split in ("train", "heldout"):
        a, b = whole.calibration(split), streamed.calibration(split)
        assert a.model_fingerprint == b.model_fingerprint
        assert all(torch.allclose(a.inputs[k].second_moment, b.inputs[k].second_moment, atol=1e-8) for k in a.inputs)
    a, b = whole.emulator(), streamed.emulator()
    assert a.fingerprint == b.fingerprint and a.ranks == b.ranks
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    streamed.run_stage("drift", isolate=False)  # the later stages take the streamed emulator as any other
    assert streamed.drift().summary["kl"] >= 0


def test_a_checkpoint_with_a_tied_head_streams_like_smollm2s(toy_task, tmp_path):
    """SmolLM2 stores its tied LM head once, under the embeddings' name; the streamed build reads it from there."""
    from transformers import LlamaForCausalLM

    model, tok = tiny_model("llama", layers=2)
    tied = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "tie_word_embeddings": True})).eval()
    tied.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    loaded, _ = load_model(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    calib = batches(tok, toy_task.train, batch_size=8, limit=16)
    whole = build_emulator(loaded, collect_stats(loaded, calib, progress=False), 0.5, progress=False)
    streamed = build_streaming(tmp_path / "ckpt", calib, 0.5, tmp_path / "streamed", progress=False)
    assert streamed.ranks == whole.ranks and streamed.original_fingerprint == whole.original_fingerprint
    ids, mask = calib[0]["input_ids"], calib[0]["attention_mask"]
    assert torch.allclose(  # not 1e-4: the first block's k and v differ by Cholesky's jitter (see above)
        streamed.model(input_ids=ids, attention_mask=mask).logits,
        whole.model(input_ids=ids, attention_mask=mask).logits,
        atol=1e-3,
    )


def _damaged(tmp_path, how: str):
    """A tiny llama checkpoint with one defect."""
    from safetensors.torch import load_file, save_file

    model, tok = tiny_model("llama", layers=2)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(file)
    if how == "index without weight_map":
        (tmp_path / "ckpt" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    elif how == "a weight of another shape":
        state["model.layers.1.self_attn.q_proj.weight"] = state["model.layers.1.self_attn.q_proj.weight"][:, :32]
    elif how == "an integer weight":
        state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"].int()
    elif how == "NaN in the last layer's weight":  # no later layer reads its output: only its own check sees it
        state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    elif how == "a block its config lacks":  # a config cut to fewer layers than the weights hold
        state.update({k.replace(".layers.1.", ".layers.2."): v.clone() for k, v in state.items() if ".layers.1." in k})
    save_file({k: v.contiguous() for k, v in state.items()}, file, metadata={"format": "pt"})
    return tmp_path / "ckpt", tok


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("index without weight_map", "lacks the field 'weight_map'"),
        ("a weight of another shape", "does not describe"),
        ("an integer weight", "does not describe"),
        ("NaN in the last layer's weight", r"layers\.1\.mlp\.down_proj holds NaN or Inf"),
        ("a block its config lacks", r"weights of 1 block\(s\) its config\.json does not have \(model\.layers\.2…"),
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_line_and_writes_nothing(toy_task, tmp_path, how, message):
    ckpt, tok = _damaged(tmp_path, how)
    calib = batches(tok, toy_task.train, batch_size=8, limit=16)
    with pytest.raises(EmlocError, match=message):  # keep_stats=True: the pipeline's route
        stream(ckpt, batch_sets={"train": calib}, output=tmp_path / "emulator", progress=False)
    assert not (tmp_path / "emulator").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"eps": -1e-3}, r"eps=-0\.001 must be a finite number > 0"),
        ({"eps": float("nan")}, r"eps=nan must be"),
        ({"eps": 0.0}, r"eps=0\.0 must be"),
        ({"shrinkage": -2.0}, r"shrinkage=-2\.0 must be a finite number ≥ 0"),
        ({"shrinkage": float("inf")}, r"shrinkage=inf must be"),
    ],
)
def test_whitening_settings_are_checked_before_any_work(sharded, toy_task, tmp_path, settings, message):
    root, (model, tok) = sharded
    calib = batches(tok, toy_task.train, batch_size=8, limit=8)
    with pytest.raises(EmlocError, match=message):
        build_streaming(root / "ckpt", calib, 0.5, tmp_path / "emulator", progress=False, **settings)
    with pytest.raises(EmlocError, match=message):
        build_emulator(model, collect_stats(model, calib, progress=False), 0.5, progress=False, **settings)
    assert not (tmp_path / "emulator").exists()


def test_an_output_over_its_own_checkpoint_is_refused_and_the_checkpoint_survives(sharded, toy_task, tmp_path):
    root, (model, tok) = sharded
    calib = batches(tok, toy_task.train, batch_size=8, limit=8)
    files = sorted(p.name for p in (root / "ckpt").iterdir())
    for output in (root / "ckpt", root):
        with pytest.raises(EmlocError, match="would replace the checkpoint it is built from"):
            build_streaming(root / "ckpt", calib, 0.5, output, overwrite=True, progress=False)
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == files
    (tmp_path / "a-file").write_text("")
    with pytest.raises(EmlocError, match="Cannot create .*a-file"):
        build_streaming(root / "ckpt", calib, 0.5, tmp_path / "a-file" / "emulator", progress=False)
    with pytest.raises(EmlocError, match="keeps nothing"):
        stream(root / "ckpt", batch_sets={"train": calib}, keep_stats=False, progress=False)


def test_blocks_with_different_attention_masks_are_refused(tmp_path, toy_task):
    """Qwen2 with a sliding window on some layers: each block needs its own mask, which a streamed build lacks."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tok = tiny_model("qwen2", layers=2)
    config = {**model.config.to_dict(), "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    Qwen2ForCausalLM(Qwen2Config(**{**config, "layer_types": None})).save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    calib = batches(tok, toy_task.train, batch_size=8, limit=8)
    with pytest.raises(EmlocError, match=r"different attention masks.*emulator\.streaming: false"):
        stream(tmp_path / "ckpt", batch_sets={"train": calib}, progress=False)


def test_token_ids_outside_the_vocabulary_are_refused(sharded, toy_task):
    root, (model, tok) = sharded
    batch = dict(batches(tok, toy_task.train, batch_size=8, limit=8)[0])
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][0, -1] = 5000
    for calibrate in (
        lambda b: collect_stats(model, [b], progress=False),
        lambda b: stream(root / "ckpt", batch_sets={"train": [b]}, progress=False),
    ):
        with pytest.raises(EmlocError, match="Token id 5000 is outside the model's vocabulary"):
            calibrate(batch)
        with pytest.raises(EmlocError, match=r"input_ids'\] must be a tensor of token ids, not list"):
            calibrate({**batch, "input_ids": batch["input_ids"].tolist()})
