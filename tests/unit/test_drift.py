import pytest

from emloc_nb import RankPlan, build_emulator, drift
from emloc_nb.data import batches
from emloc_nb.models import block_linears, linear_weight


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
