import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from emloc_nb import (
    EmlocError,
    LoraSpec,
    TrainSpec,
    build_emulator,
    collect_stats,
    correct_layer,
    correct_lora,
    finetune,
    fingerprint,
    tiny_model,
)
from emloc_nb.correction_report import CorrectionReport
from emloc_nb.layer_correction import clamp_factors, error_terms
from emloc_nb.lora import load_adapter, lora_factors, peft_config, save_adapter
from emloc_nb.structure import linear_weight, model_inputs
from emloc_nb.tokens import batches

D_OUT, D_IN, R = 12, 10, 3


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    w_e = w + 0.3 * torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    a = torch.randn(R, D_IN, generator=g, dtype=torch.float64)
    b = torch.randn(D_OUT, R, generator=g, dtype=torch.float64)
    return w, w_e, a, b


@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.37, 16 / math.sqrt(R)])  # alpha/r and rsLoRA's alpha/√r
def test_exact_on_the_lora_subspace_and_untouched_off_it(scaling):
    w, w_e, a, b = _layer()
    lc = correct_layer(w, w_e, a, b, scaling, clamp=math.inf)
    delta_w = scaling * b @ a
    corrected = w + lc.b @ lc.a
    inside = a.T @ torch.randn(R, 5, dtype=torch.float64)  # x in span(Aᵀ)
    assert torch.allclose(corrected @ inside, (w_e + delta_w) @ inside, atol=1e-10)
    q, _ = torch.linalg.qr(a.T)
    outside = torch.randn(D_IN, 5, dtype=torch.float64)
    outside = outside - q @ (q.T @ outside)  # x ⊥ span(Aᵀ)
    assert torch.allclose(corrected @ outside, w @ outside, atol=1e-10)
    assert torch.allclose(lc.b_prime @ lc.a, delta_w, atol=1e-10)  # the re-parametrisation keeps ΔW


def test_zero_lora_stays_zero():
    w, w_e, a, b = _layer()
    for clamp in (0.0, 3.0, math.inf):
        lc = correct_layer(w, w_e, torch.zeros_like(a), torch.zeros_like(b), 2.0, clamp)
        assert torch.count_nonzero(lc.b @ lc.a) == 0
    # an untrained LoRA (B = 0, A random) stays zero under any finite clamp
    assert torch.count_nonzero(correct_layer(w, w_e, a, torch.zeros_like(b), 2.0, 3.0).b) == 0


def test_full_rank_emulator_leaves_the_lora_unchanged():
    w, _, a, b = _layer()
    for clamp in (3.0, math.inf):
        lc = correct_layer(w, w.clone(), a, b, 1.7, clamp)
        assert torch.allclose(lc.b @ lc.a, 1.7 * b @ a, atol=1e-10)
        assert (lc.kappa == 1).all()


def test_clamping_never_increases_a_columns_correction():
    w, w_e, a, b = _layer(1)
    previous = None
    for clamp in (0.0, 0.1, 0.5, 1.0, 3.0, 10.0, math.inf):
        lc = correct_layer(w, w_e, a, b, 1.0, clamp)
        assert ((lc.kappa >= 0) & (lc.kappa <= 1)).all()
        applied = (lc.b_prime - lc.b).norm(dim=0)  # ‖κ_i D_i‖
        assert (applied <= lc.d.norm(dim=0) + 1e-12).all()
        if previous is not None:
            assert (applied >= previous - 1e-12).all()  # a larger L clamps less
        previous = applied
    naive = correct_layer(w, w_e, a, b, 1.0, 0.0)
    assert torch.allclose(naive.b, naive.b_prime)  # L = 0 is the naive transfer
    assert torch.equal(clamp_factors(torch.tensor([1.0]), torch.tensor([0.0]), 3.0), torch.tensor([1.0]))


def test_error_terms_match_activations():
    w, w_e, a, b = _layer(2)
    x = torch.randn(200, D_IN, dtype=torch.float64) @ torch.randn(D_IN, D_IN, dtype=torch.float64)
    cov = x.T @ x / len(x)
    lc = correct_layer(w, w_e, a, b, 1.3, clamp=0.8)
    terms = error_terms(w, w_e, lc, cov)
    from emloc_nb.layer_correction import kappa_errors

    tuned = w_e + 1.3 * b @ a
    proj = lc.a.T @ lc.a
    for kappa in (torch.zeros(R, dtype=torch.float64), lc.kappa, torch.ones(R, dtype=torch.float64)):
        b_c = lc.b_prime - lc.d * kappa
        out = x @ (w + b_c @ lc.a).T
        overall, sub = kappa_errors(terms, kappa)
        assert overall == pytest.approx(float((out - x @ tuned.T).norm() / (x @ tuned.T).norm()), rel=1e-8)
        xs = x @ proj
        assert sub == pytest.approx(
            float((xs @ (w + b_c @ lc.a).T - xs @ tuned.T).norm() / (xs @ tuned.T).norm()), rel=1e-8, abs=1e-12
        )


@pytest.fixture
def trained(toy_task, tmp_path):
    model, tok = tiny_model("llama")
    calib = batches(tok, toy_task.train, batch_size=8, limit=32)
    emulator = build_emulator(model, collect_stats(model, calib, progress=False), 0.5, progress=False)
    heldout = collect_stats(model, batches(tok, toy_task.test, batch_size=8), progress=False)
    result = finetune(
        emulator.model,
        tok,
        toy_task,
        tmp_path / "ft",
        lora=LoraSpec(r=4, alpha=8, dropout=0.0),
        config=TrainSpec(steps=4, batch_size=8, lr=1e-2, checkpoint_every=0),
        progress=False,
    )
    return model, tok, emulator, heldout, result.adapter_dir


def test_corrected_adapter_is_standard_peft_and_matches_the_merge(trained, tmp_path):
    model, tok, emulator, heldout, adapter = trained
    report = correct_lora(model, emulator, adapter, tmp_path / "corrected", heldout=heldout)
    assert (tmp_path / "corrected" / "adapter_config.json").is_file()
    assert (tmp_path / "corrected" / "adapter_model.safetensors").is_file()
    batch = batches(tok, emulator_task_rows(tok), batch_size=4)[0]
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "corrected"))
    with torch.no_grad():
        attached = peft_model(**model_inputs(model, batch)).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(**model_inputs(model, batch)).logits
    assert torch.allclose(attached, merged, atol=1e-5)
    # the merged weights are W + B_c A_c, which on the LoRA subspace is W_E + ΔW
    row = report.rows[0]
    assert row["after_subspace"] < 1e-6 or row["clamped"] > 0
    assert {"before_all", "after_all", "d_norm", "kappa_mean"} <= set(row)
    report.save(tmp_path / "report")
    loaded = CorrectionReport.load(tmp_path / "report")
    for new, old in zip(loaded.rows_at(report.clamp), report.rows):
        assert new["after_all"] == pytest.approx(old["after_all"], rel=1e-9) and new["clamped"] == old["clamped"]
    for r in report.rows:
        again = loaded.errors_at(r["name"], report.clamp)
        assert again["error_all"] == pytest.approx(r["after_all"], rel=1e-9, abs=1e-12)
        assert loaded.errors_at(r["name"], 0.0)["error_all"] == pytest.approx(r["before_all"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("clamp", [math.inf, 0.0])
def test_written_adapter_fits_the_original_exactly(trained, tmp_path, clamp):
    """Through the files and stock peft: with no clamp, W + ΔW_c = W_E + ΔW on span(Aᵀ) and W off it;
    with L = 0, ΔW_c is the emulator's own ΔW (the naive transfer)."""
    model, tok, emulator, heldout, adapter = trained
    correct_lora(model, emulator, adapter, tmp_path / "corrected", clamp=clamp)
    on_emulator = load_adapter(emulator.model, adapter)
    factors = lora_factors(on_emulator)
    on_emulator.unload()
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "corrected"))
    modules = dict(peft_model.base_model.model.named_modules())
    emulated = dict(emulator.model.named_modules())
    g = torch.Generator().manual_seed(0)
    for name, (a, b, s) in factors.items():
        a, b = a.double(), b.double()
        layer = modules[name]
        w, w_e = layer.base_layer.weight.double(), linear_weight(emulated[name])
        delta_c = layer.get_delta_weight("default").double()
        x = torch.randn(a.shape[1], 6, generator=g, dtype=torch.float64)
        inside = a.T @ torch.linalg.lstsq(a.T, x).solution  # the projection of x onto span(Aᵀ)
        outside = x - inside
        if math.isinf(clamp):
            target = (w_e + s * b @ a) @ inside
            assert torch.allclose((w + delta_c) @ inside, target, atol=1e-5 * target.abs().max())
            assert (delta_c @ outside).abs().max() <= 1e-5 * (w @ outside).abs().max()
        else:
            assert torch.allclose(delta_c, s * b @ a, atol=1e-6 * (s * b @ a).abs().max() + 1e-12)
    peft_model.unload()


def emulator_task_rows(tok):
    from datasets import Dataset

    return Dataset.from_list(
        [{"messages": [{"role": "user", "content": f"sample {i}"}], "answer": "yes"} for i in range(4)]
    )


def test_correction_refuses_a_foreign_adapter_or_original(trained, tmp_path):
    model, tok, emulator, heldout, adapter = trained
    other, _ = tiny_model("llama", seed=5)
    with pytest.raises(EmlocError, match="fingerprint"):
        correct_lora(other, emulator, adapter, tmp_path / "x")
    emulator2 = build_emulator(model, None, 0.3, mode="plain", progress=False)
    with pytest.raises(EmlocError, match="fingerprint"):
        correct_lora(model, emulator2, adapter, tmp_path / "y")
    other_stats = collect_stats(other, batches(tok, emulator_task_rows(tok), batch_size=4), progress=False)
    with pytest.raises(EmlocError, match="held-out statistics"):
        correct_lora(model, emulator, adapter, tmp_path / "w", heldout=other_stats)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "w").exists()
    with pytest.raises(EmlocError, match=r"clamp=-1 must be ≥ 0 \(0: the naive transfer"):
        correct_lora(model, emulator, adapter, tmp_path / "z", clamp=-1)


def test_correction_refuses_what_it_cannot_carry_over(trained, tmp_path):
    model, tok, emulator, heldout, adapter = trained
    config = peft_config(LoraSpec(r=2, alpha=2), emulator.model)
    config.bias = "lora_only"  # trained biases have no counterpart in the corrected factors
    peft_model = get_peft_model(emulator.model, config)
    save_adapter(peft_model, tmp_path / "biased", base_fingerprint=fingerprint(emulator.model))
    peft_model.unload()
    with pytest.raises(EmlocError, match=r"sets \['bias'\], which emloc-nb adapters never use"):
        correct_lora(model, emulator, tmp_path / "biased", tmp_path / "out")
    assert not (tmp_path / "out").exists()
