"""Aligning the emulator with the original (emloc_nb.alignment): the distillation, its account, and its setting."""

from __future__ import annotations

import pytest
import torch

from emloc_nb.alignment import align_emulator, distillation_targets, mean_kl, token_kl
from emloc_nb.config import RunConfig, with_added_defaults
from emloc_nb.emulator import Emulator
from emloc_nb.errors import EmlocError
from emloc_nb.factoring import LowRankLinear
from emloc_nb.run import Run
from emloc_nb.tokens import batches

from ..conftest import tiny_emulator, tiny_run_config


def test_kl_is_zero_for_the_same_states_and_positive_otherwise(llama):
    model, _ = llama
    head = model.get_output_embeddings()
    h = torch.randn(1, 5, model.config.hidden_size)
    mask = torch.ones(1, 5)
    assert token_kl(head, h, h, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert token_kl(head, h + torch.randn_like(h), h, mask).item() > 0
    # masked tokens do not count: a change there leaves the mean as it was
    other = h.clone()
    other[0, 4] += 10
    assert token_kl(head, other, h, torch.tensor([[1.0, 1, 1, 1, 0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_alignment_brings_the_emulator_closer_and_changes_only_its_factors(toy_task):
    original, tok, emulator = tiny_emulator(toy_task)
    train = batches(tok, toy_task.train, batch_size=8, limit=32)
    heldout = batches(tok, toy_task.validation, batch_size=8, limit=16)
    factors = {n: p.detach().clone() for n, p in emulator.model.named_parameters() if ".down." in n or ".up." in n}
    others = {n: p.detach().clone() for n, p in original.named_parameters()}
    targets = distillation_targets(original, train, heldout)
    account = align_emulator(emulator.model, targets, steps=6, lr=1e-3, seed=0, progress=False)

    assert account["heldout_kl_after"] < account["heldout_kl_before"]
    assert len(account["train_kl"]) == 6 and account["train_kl"][-1] < account["train_kl"][0]
    assert account["examples"] == 32
    # the factors moved; the original (whose other tensors the emulator shares) did not
    moved = [n for n, p in emulator.model.named_parameters() if n in factors and not torch.equal(p, factors[n])]
    assert moved
    assert all(torch.equal(p, others[n]) for n, p in original.named_parameters())
    # the account is measured: recomputing the held-out KL gives its last figure
    assert len(targets.heldout) == sum(len(b["input_ids"]) for b in heldout) and all(
        len(r["input_ids"]) == 1 for r in targets.heldout
    )  # one per row
    assert mean_kl(emulator.model, targets.heldout, targets.heldout_states) == pytest.approx(
        account["heldout_kl_after"], rel=1e-5
    )
    # training switched off again: no parameter of either model is left needing gradients it did not before
    assert not any(
        p.requires_grad for m in emulator.model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()
    )
    assert all(p.requires_grad for p in original.parameters())


def test_alignment_is_reproducible_by_seed(toy_task):
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        original, tok, emulator = tiny_emulator(toy_task)
        train = batches(tok, toy_task.train, batch_size=8, limit=16)
        targets = distillation_targets(original, train, train[:1])
        align_emulator(emulator.model, targets, steps=2, lr=1e-2, seed=3, progress=False)
        results.append(emulator.fingerprint)
    assert results[0] == results[1]


def test_an_emulator_without_low_rank_layers_is_refused(toy_task):
    original, tok, _ = tiny_emulator(toy_task)
    train = batches(tok, toy_task.train, batch_size=8, limit=8)
    with pytest.raises(EmlocError, match="no low-rank layers"):
        align_emulator(original, distillation_targets(original, train, train), steps=1, lr=1e-3, progress=False)


def test_the_account_is_saved_with_the_emulator(toy_task, tmp_path):
    original, tok, emulator = tiny_emulator(toy_task)
    train = batches(tok, toy_task.train, batch_size=8, limit=8)
    targets = distillation_targets(original, train, train)
    emulator.alignment = align_emulator(emulator.model, targets, steps=1, lr=1e-3, progress=False)
    emulator.save(tmp_path / "emu")
    loaded = Emulator.load(tmp_path / "emu", original=original)
    assert loaded.alignment == emulator.alignment
    assert loaded.fingerprint == emulator.fingerprint


def test_align_steps_is_checked():
    with pytest.raises(EmlocError, match="streaming"):
        RunConfig.from_dict({"emulator": {"align_steps": 4, "streaming": True}})
    with pytest.raises(EmlocError, match="align_steps"):
        RunConfig.from_dict({"emulator": {"align_steps": -1}})
    with pytest.raises(EmlocError, match="align_lr"):
        RunConfig.from_dict({"emulator": {"align_lr": 0}})


def test_settings_recorded_before_a_setting_existed_read_as_its_default():
    now = RunConfig().to_dict()
    older = {"dtype": now["dtype"], "emulator": {k: v for k, v in now["emulator"].items() if not k.startswith("align")}}
    assert with_added_defaults(older) == {"dtype": now["dtype"], "emulator": now["emulator"]}
    changed = RunConfig.from_dict({"emulator": {"align_steps": 8}}).to_dict()["emulator"]
    assert with_added_defaults(older)["emulator"] != changed


def test_a_run_with_alignment(tiny_files, tmp_path):
    _, model, data = tiny_files
    config = tiny_run_config(model, data, emulator={"plan": {"ratio": 0.5}, "align_steps": 2, "align_lr": 1e-3})
    run = Run(tmp_path / "run", config)
    run.run_all(isolate=False, until="emulator")
    record = run.stage_records()["emulator"]
    assert record["alignment"]["steps"] == 2
    assert run.emulator().alignment == record["alignment"]
    assert record["alignment"]["heldout_kl_after"] < record["alignment"]["heldout_kl_before"]
