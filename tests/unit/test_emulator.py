import pytest
import torch

from emloc_nb import EmlocError, Emulator, RankPlan, allocate, build_emulator, collect_stats, fingerprint, tiny_model
from emloc_nb.emulator_drift import relative_error
from emloc_nb.factoring import LowRankLinear, whitening
from emloc_nb.ranks import rank_for_ratio
from emloc_nb.structure import block_linears, linear_weight, model_inputs
from emloc_nb.tokens import batches


def _full_rank_plan(model):
    return RankPlan(ranks={n: min(linear_weight(m).shape) for n, m in block_linears(model).items()})


def test_full_rank_reproduces_w(tiny, toy_task):
    model, tok = tiny
    stats = collect_stats(model, batches(tok, toy_task.train, batch_size=8, limit=24), progress=False)
    for mode in ("whitened", "plain"):
        emulator = build_emulator(model, stats, _full_rank_plan(model), mode=mode, progress=False)
        emulated = dict(emulator.model.named_modules())
        for name, module in block_linears(model).items():
            assert isinstance(emulated[name], LowRankLinear)
            w = linear_weight(module)
            assert torch.allclose(linear_weight(emulated[name]), w.double(), atol=2e-5 * w.abs().max().item())


def _activations(model, calib, layer):
    xs = []
    handle = dict(model.named_modules())[layer].register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    with torch.no_grad():
        for b in calib:
            model(**model_inputs(model, b))
    handle.remove()
    return torch.cat([x[b["attention_mask"].bool()] for x, b in zip(xs, calib)]).double()


def test_whitened_beats_plain_and_measured_matches_predicted(calibrated):
    model, tok, calib, stats = calibrated
    plan = RankPlan(0.4)
    whitened = build_emulator(model, stats, plan, progress=False)
    plain = build_emulator(model, stats, plan, mode="plain", progress=False)
    for name, module in block_linears(model).items():
        x = _activations(model, calib, name)
        w = linear_weight(module).double()
        ref = (x @ w.T).norm()
        errs = {}
        for label, emu in (("whitened", whitened), ("plain", plain)):
            w_e = linear_weight(dict(emu.model.named_modules())[name]).double()
            errs[label] = float((x @ (w - w_e).T).norm() / ref)
            predicted = emu.spectra.layer(name)["predicted_error"]
            assert errs[label] == pytest.approx(predicted, rel=0.01, abs=1e-4)
        assert errs["whitened"] <= errs["plain"] + 1e-9
        # the closed form over the second moment agrees with the activations
        w_e = linear_weight(dict(whitened.model.named_modules())[name]).double()
        assert relative_error(w - w_e, w, stats.layer(name).covariance) == pytest.approx(errs["whitened"], rel=1e-4)


def test_spectrum_table(calibrated):
    model, tok, calib, stats = calibrated
    plan = RankPlan(0.5, rules={r"layers\.1\.mlp\.down_proj": 1.0, r"self_attn\.q_proj": 0.25})
    emulator = build_emulator(model, stats, plan, progress=False)
    table = emulator.spectra
    assert [s["name"] for s in table.skipped] == ["lm_head"]
    down = table.layer("model.layers.1.mlp.down_proj")
    assert down["dense"] and "kept dense" in down["reason"] and down["rank"] is None
    assert not isinstance(emulator.model.model.layers[1].mlp.down_proj, LowRankLinear)
    q = table.layer("model.layers.0.self_attn.q_proj")
    assert q["rank"] == rank_for_ratio(64, 64, 0.25) and "q_proj" in q["reason"]
    for row in table.rows:
        sv = table.spectrum(row["name"]).double()
        assert (sv[:-1] >= sv[1:] - 1e-5).all()
        if not row["dense"]:
            # kept energy at rank r is the top-r squared whitened singular values over the total
            assert row["energy_kept"] == pytest.approx(float((sv[: row["rank"]] ** 2).sum() / (sv**2).sum()), rel=1e-4)
            assert table.error_at(row["name"], row["rank"]) == pytest.approx(row["predicted_error"], rel=1e-3, abs=1e-6)
            assert row["params_kept"] <= 0.5 + 1e-9 or row["name"].endswith("q_proj")
    assert emulator.parameter_count() < sum(p.numel() for p in model.parameters())


def test_original_is_untouched_and_weights_are_shared(calibrated):
    model, tok, calib, stats = calibrated
    before = fingerprint(model)
    emulator = build_emulator(model, stats, 0.5, progress=False)
    assert fingerprint(model) == before
    assert emulator.model.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert isinstance(emulator.model.model.layers[0].mlp.up_proj, LowRankLinear)
    assert not isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)


def test_save_load_round_trip_and_fingerprint_check(tiny, toy_task, tmp_path):
    model, tok = tiny
    calib = batches(tok, toy_task.train, batch_size=8, limit=16)
    emulator = build_emulator(model, collect_stats(model, calib, progress=False), 0.5, progress=False)
    emulator.save(tmp_path / "emu", tokenizer=tok)
    loaded = Emulator.load(tmp_path / "emu", original=model)
    with torch.no_grad():
        a = emulator.model(**model_inputs(model, calib[0])).logits
        b = loaded.model(**model_inputs(model, calib[0])).logits
    assert torch.equal(a, b)
    assert loaded.fingerprint == emulator.fingerprint and loaded.ranks == emulator.ranks
    assert loaded.spectra.rows == emulator.spectra.rows
    other, _ = tiny_model("llama", seed=7) if "llama" not in type(model).__name__.lower() else tiny_model("qwen2")
    with pytest.raises(EmlocError, match="fingerprint"):
        Emulator.load(tmp_path / "emu", original=other)


def test_stats_from_another_model_are_refused(calibrated):
    *_, stats = calibrated
    other, _ = tiny_model("llama", seed=3)
    with pytest.raises(EmlocError, match="fingerprint"):
        build_emulator(other, stats, 0.5, progress=False)


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(EmlocError, match=r"outside \(0, 1\]"):
        RankPlan(ratio)


def test_rule_matching_no_layer_is_refused(calibrated):
    model, tok, calib, stats = calibrated
    with pytest.raises(EmlocError, match="match no layer"):
        build_emulator(model, stats, RankPlan(0.5, rules={r"layers\.99\.": 1.0}), progress=False)


def test_explicit_rank_beyond_the_layer_is_refused(calibrated):
    model, tok, calib, stats = calibrated
    name, layer = next(iter(block_linears(model).items()))
    too_big = min(linear_weight(layer).shape) + 1
    with pytest.raises(EmlocError, match=f"Rank {too_big} for .* outside 1…"):
        build_emulator(model, stats, RankPlan(ranks={name: too_big}), progress=False)


def test_budget_below_rank_one_everywhere_is_refused(calibrated):
    model, tok, calib, stats = calibrated
    spectra = build_emulator(model, stats, 0.5, progress=False).spectra
    smallest = sum(r["d_out"] + r["d_in"] for r in spectra.rows) / sum(r["d_out"] * r["d_in"] for r in spectra.rows)
    for strategy in ("uniform", "energy"):
        with pytest.raises(EmlocError, match="below the smallest emulator"):
            allocate(spectra, smallest * 0.9, strategy=strategy)
        plan = allocate(spectra, smallest * 1.01, strategy=strategy)
        kept = build_emulator(model, stats, plan, progress=False).spectra.totals()["share_kept"]
        assert kept <= smallest * 1.01 + 1e-9


def test_whitening_handles_singular_second_moments():
    x = torch.randn(5, 16, dtype=torch.float64)  # fewer tokens than channels: C is singular
    c = x.T @ x / 5
    s, method = whitening(c)
    assert method.startswith("cholesky") and torch.allclose(s @ s.T, c, atol=1e-4 * c.diagonal().mean())
    s, method = whitening(-torch.eye(8, dtype=torch.float64))  # not positive semi-definite at all
    assert method == "eigh" and torch.isfinite(s).all() and torch.linalg.matrix_rank(s) == 8


@pytest.mark.parametrize("c", [torch.eye(6, dtype=torch.float64) * 2, -torch.eye(6, dtype=torch.float64)])
def test_whitening_keeps_the_callers_matrix_unless_told_it_may_overwrite(c):
    kept = c.clone()
    s, method = whitening(c)
    assert torch.equal(c, kept)
    scratch = c.clone()
    s2, method2 = whitening(scratch, overwrite=True)
    assert torch.equal(s2, s) and method2 == method


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
@pytest.mark.parametrize("shrinkage", [0.0, 0.3])
@torch.no_grad()
def test_whitened_factors_are_the_truncated_svd_of_w_s(shape, shrinkage):
    """The factors from float64 Gram matrices equal a float64 SVD of W S: from the whitener (Sᵀ WᵀW S, or
    (W S)(W S)ᵀ for a layer wider in than out), and from the output's second moment W C' Wᵀ with no input
    moment at all."""
    from emloc_nb.calibration import CalibrationStats, InputStats
    from emloc_nb.factoring import Whiteners, factor_layer, output_moment
    from emloc_nb.ranks import LayerChoice

    torch.manual_seed(0)
    d_out, d_in = shape
    layer = torch.nn.Linear(d_in, d_out, bias=True)
    x = torch.randn(400, d_in) * torch.linspace(0.05, 3, d_in)  # channels of very different scales
    inputs = InputStats((x.T @ x).double(), x.abs().sum(0).double(), x.abs().amax(0).double(), 400, ["layer"])
    whitener = Whiteners(CalibrationStats({"layer": inputs}, "", 1), 1e-6, shrinkage).get("layer")
    assert whitener[1] == "cholesky"
    w = layer.weight.double()
    u, sv, _ = torch.linalg.svd(w @ whitener[0], full_matrices=False)  # the definition, in float64
    y = x @ layer.weight.T  # the output without its bias
    moment = output_moment(layer.weight, (y.T @ y).double(), x.square().sum(0).double(), 400, 1e-6, shrinkage)
    for rank in (5, None):
        choice = LayerChoice("layer", d_out, d_in, rank, "test")
        routes = [factor_layer("layer", layer, choice, whitener, "whitened")]
        routes.append(factor_layer("layer", layer, choice, None, "whitened", moment=moment))
        for (low, row, spectra), method in zip(routes, ["cholesky", "output moment"]):
            assert row["whitening"] == method
            error = 0.0 if rank is None else float((sv[rank:] ** 2).sum().sqrt() / (sv**2).sum().sqrt())
            assert row["predicted_error"] == pytest.approx(error, rel=1e-5, abs=1e-12)
            plain = torch.linalg.svdvals(w)
            for values, kind in ((sv, "whitened"), (plain, "plain")):  # a d_out² Gram adds d_out − d_in (near) zeros
                found = spectra[kind].double()
                assert torch.allclose(found[: len(values)], values, rtol=0, atol=1e-5 * float(values[0])), kind
                assert float(found[len(values) :].sum()) < 1e-2 * float(values[0]), kind  # σ = √(rounding)
            if rank is None:
                assert low is None
            else:  # W_E = U_r U_rᵀ W
                assert torch.allclose(low.dense_weight(), u[:, :rank] @ (u[:, :rank].T @ w), atol=1e-5)
                assert torch.equal(low.up.bias, layer.bias)
    with pytest.raises(ValueError, match="plain mode no moment"):
        factor_layer("layer", layer, choice, None, "plain", moment=moment)
    with pytest.raises(ValueError, match="a whitener or else an output moment"):
        factor_layer("layer", layer, choice, None, "whitened")


def test_a_whitened_build_takes_no_svd_and_keeps_each_inputs_jitter(calibrated, monkeypatch):
    """Every layer is factored from Gram eigen-decompositions; a layer wider in than out (its d_out² Gram,
    (W S)(W S)ᵀ) whitens with the same S as the rest, the larger jitter of an indefinite moment included."""
    from emloc_nb.calibration import CalibrationStats, InputStats

    model, _, _, stats = calibrated
    down = next(n for n in block_linears(model) if n.endswith("down_proj"))
    inputs = dict(stats.inputs)
    key = stats.key_for(down)
    moment = inputs[key].second_moment.clone()
    moment[0, :] = moment[:, 0] = 0  # a dead channel, summed a hair below zero: Cholesky needs more jitter
    moment[0, 0] = -1e-3 * float(moment.diagonal().mean())
    inputs[key] = InputStats(moment, inputs[key].abs_sum, inputs[key].abs_max, inputs[key].tokens, [down])
    stats = CalibrationStats(inputs, stats.model_fingerprint, stats.examples)

    def no_svd(*args, **kwargs):
        raise AssertionError("the whitened build took an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    rows = {r["name"]: r for r in build_emulator(model, stats, 0.5, progress=False).spectra.rows}
    assert rows[down]["d_in"] > rows[down]["d_out"] and rows[down]["whitening"].startswith("cholesky+jitter")
    for name, row in rows.items():
        assert row["whitening"] == whitening(stats.layer(name).covariance)[1], name
