import pytest

from emloc_nb import RankPlan, build_emulator, drift
from emloc_nb.structure import block_linears, linear_weight
from emloc_nb.tokens import batches


def test_drift_of_a_full_rank_emulator_is_nil(calibrated, toy_task):
    model, tok, calib, stats = calibrated
    full = RankPlan(ranks={n: min(linear_weight(m).shape) for n, m in block_linears(model).items()})
    held = batches(tok, toy_task.test, batch_size=8)
    report = drift(model, build_emulator(model, stats, full, progress=False), held, tokenizer=tok, progress=False)
    assert max(r["measured_error"] for r in report.rows) < 1e-4
    assert report.summary["kl"] < 1e-6 and report.summary["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert all(b["cosine"] > 0.9999 for b in report.blocks)
    compressed = drift(model, build_emulator(model, stats, 0.3, progress=False), held, tokenizer=tok, progress=False)
    assert compressed.summary["kl"] > report.summary["kl"] and len(compressed.tokens) == 4
    assert len(compressed.tokens[0]["tokens"]) == len(compressed.tokens[0]["kl"])


def test_end_to_end_drift_matches_a_whole_batch_reference(calibrated, toy_task):
    import math

    import torch

    model, tok, calib, stats = calibrated
    emulator = build_emulator(model, stats, 0.4, progress=False)
    held = batches(tok, toy_task.test, batch_size=8)
    report = drift(model, emulator, held, tokenizer=tok, progress=False)
    kl = nll_o = nll_e = 0.0
    tokens = predicted = 0
    with torch.no_grad():
        for b in held:
            inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
            lo = model(**inputs).logits.log_softmax(-1)
            le = emulator.model(**inputs).logits.log_softmax(-1)
            mask = b["attention_mask"].bool()
            kl += float((lo.exp() * (lo - le)).sum(-1)[mask].sum())
            tokens += int(mask.sum())
            pred = mask[:, :-1] & mask[:, 1:]
            target = b["input_ids"][:, 1:, None]
            nll_o -= float(lo[:, :-1].gather(2, target).squeeze(2)[pred].sum())
            nll_e -= float(le[:, :-1].gather(2, target).squeeze(2)[pred].sum())
            predicted += int(pred.sum())
    s = report.summary
    assert s["kl"] == pytest.approx(kl / tokens, rel=1e-5) and s["kl"] > 0
    assert s["ppl_original"] == pytest.approx(math.exp(nll_o / predicted), rel=1e-5)
    assert s["ppl_emulator"] == pytest.approx(math.exp(nll_e / predicted), rel=1e-5)
