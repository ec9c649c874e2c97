"""The corrections beyond the paper, and the transfer diagnostics: each against an invariant."""

import math

import pytest
import torch
from peft import PeftModel

from emloc_nb import LoraSpec, TrainSpec, build_emulator, collect_stats, correct_lora, finetune, tiny_model
from emloc_nb.config import resolve_prior_target
from emloc_nb.errors import EmlocError
from emloc_nb.layer_correction import lstsq_kappa, placebo_layer
from emloc_nb.lora import attach_lora, load_adapter, lora_factors
from emloc_nb.prior import answer_tokens, fit_prior, label_target
from emloc_nb.scoring import answer_states
from emloc_nb.tokens import batches


@pytest.fixture(scope="module")
def setup(toy_task, tmp_path_factory):
    """A tiny llama, its emulator at ρ = 0.5, a LoRA trained on the emulator, and statistics."""
    tmp = tmp_path_factory.mktemp("transfer")
    model, tok = tiny_model("llama")
    stats = collect_stats(model, batches(tok, toy_task.train, batch_size=8, limit=32), progress=False)
    heldout = collect_stats(model, batches(tok, toy_task.validation, batch_size=8), progress=False)
    emulator = build_emulator(model, stats, 0.5, progress=False)
    adapter = finetune(
        emulator.model,
        tok,
        toy_task,
        tmp / "ft",
        lora=LoraSpec(r=4, alpha=8),
        config=TrainSpec(steps=6, batch_size=8, lr=2e-2, checkpoint_every=0),
        progress=False,
    ).adapter_dir
    prompts = list(toy_task.train.select(range(24))["messages"])
    return model, tok, emulator, stats, heldout, adapter, prompts, tmp


def _mean_answer_distribution(model, tok, prompts):
    states = answer_states(model, tok, prompts)
    head = model.get_output_embeddings()
    with torch.no_grad():
        return head(states).double().softmax(-1).mean(0)


def test_fit_prior_matches_the_target_distribution_on_its_support():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    states = torch.randn(50, 16, generator=g) * 0.1 + torch.randn(16, generator=g)  # concentrated, like real ones
    target = torch.softmax(torch.randn(40, generator=g) * 3, 0)
    fit = fit_prior(states, head, target, min_prob=1e-3)
    assert len(fit.token_ids) > 3
    assert fit.after == pytest.approx(fit.target, rel=1e-4)
    assert fit.before != pytest.approx(fit.target, rel=1e-2)
    assert fit.direction @ states.mean(0) == pytest.approx(1.0, rel=1e-5)  # a·h̄ = 1: the offset is b on average


def test_prior_makes_the_original_answer_like_the_tuned_emulator_on_average(setup, tmp_path):
    """Through the files and stock peft: the original + corrected adapter's mean answer distribution over the
    calibration prompts equals the fine-tuned emulator's on the support tokens; without the prior it does not."""
    model, tok, emulator, stats, heldout, adapter, prompts, _ = setup
    report = correct_lora(
        model, emulator, adapter, tmp_path / "c", heldout=heldout, prior_prompts=prompts, tokenizer=tok
    )
    correct_lora(model, emulator, adapter, tmp_path / "plain", heldout=heldout)
    tuned_emulator = load_adapter(emulator.model, adapter)
    target = _mean_answer_distribution(tuned_emulator, tok, prompts)
    tuned_emulator.unload()
    ids = report.prior["token_ids"]
    for path, matches in ((tmp_path / "c", True), (tmp_path / "plain", False)):
        corrected = PeftModel.from_pretrained(model, str(path))
        got = _mean_answer_distribution(corrected, tok, prompts)
        corrected.unload()
        gap = float((got[ids] - target[ids]).abs().max())
        assert (gap < 2e-4) if matches else (gap > 1e-3), (path.name, gap)
    assert report.prior["after"] == pytest.approx(report.prior["target"], rel=1e-3)


def test_prior_of_an_exact_emulator_is_no_offset(setup, tmp_path):
    """A full-rank emulator equals the original, so the LoRA moves both alike and no offset is needed."""
    model, tok, _, stats, _, _, prompts, tmp = setup
    exact = build_emulator(model, stats, 1.0, progress=False)
    adapter = finetune(
        exact.model,
        tok,
        _toy(prompts),
        tmp / "exact",
        lora=LoraSpec(r=4, alpha=8),
        config=TrainSpec(steps=3, batch_size=4, lr=2e-2, checkpoint_every=0),
        progress=False,
    ).adapter_dir
    report = correct_lora(model, exact, adapter, tmp_path / "c", prior_prompts=prompts, tokenizer=tok)
    assert max(abs(b) for b in report.prior["bias"]) < 1e-4


def _toy(prompts):
    from datasets import Dataset

    from emloc_nb.tasks import Task

    rows = Dataset.from_list([{"messages": p, "answer": "yes" if i % 2 else "no"} for i, p in enumerate(prompts)])
    return Task("toy", rows, rows, rows, choices=["no", "yes"])


def test_lstsq_kappa_minimises_the_heldout_error(setup, tmp_path):
    model, tok, emulator, stats, heldout, adapter, _, _ = setup
    paper = correct_lora(model, emulator, adapter, tmp_path / "paper", heldout=heldout)
    fitted = correct_lora(model, emulator, adapter, tmp_path / "ls", heldout=heldout, kappa="lstsq")
    for row in fitted.rows:
        name = row["name"]
        for clamp in (0.0, 1.0, 3.0, 10.0, math.inf):
            assert row["after_all"] <= paper.errors_at(name, clamp)["error_all"] + 1e-9
    s = fitted.stats[fitted.rows[0]["name"]]
    kappa = lstsq_kappa(s)  # the closed form is a stationary point: a small step anywhere cannot lower the error
    for direction in torch.eye(len(kappa), dtype=torch.float64):
        for eps in (1e-3, -1e-3):
            k = kappa + eps * direction
            worse = s["a"] - 2 * k @ s["m"] + k @ s["q"] @ k
            assert worse >= s["a"] - 2 * kappa @ s["m"] + kappa @ s["q"] @ kappa - 1e-12


def test_placebo_keeps_the_lora_and_corrects_a_random_subspace():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(9, 7, generator=g, dtype=torch.float64)
    w_e = w + 0.2 * torch.randn(9, 7, generator=g, dtype=torch.float64)
    a = torch.randn(2, 7, generator=g, dtype=torch.float64)
    b = torch.randn(9, 2, generator=g, dtype=torch.float64)
    a_p, b_p = placebo_layer(w, w_e, a, b, 2.0, math.inf, seed=3)
    assert a_p.shape == (4, 7) and b_p.shape == (9, 4)
    r = a_p[2:].T
    assert torch.allclose(r.T @ r, torch.eye(2, dtype=torch.float64), atol=1e-12)  # orthonormal
    # with no clamp: the LoRA's ΔW, minus the emulator's error on the random subspace
    assert torch.allclose(b_p @ a_p, 2.0 * b @ a - (w - w_e) @ r @ r.T, atol=1e-10)


def test_placebo_adapter_has_twice_the_rank_and_loads(setup, tmp_path):
    model, tok, emulator, _, _, adapter, _, _ = setup
    correct_lora(model, emulator, adapter, tmp_path / "p", placebo_seed=0)
    placebo = PeftModel.from_pretrained(model, str(tmp_path / "p"))
    ranks = {a.shape[0] for a, _, _ in lora_factors(placebo).values()}
    placebo.unload()
    assert ranks == {8}


def test_diagnostics_overlap_and_share(setup, tmp_path):
    model, tok, emulator, stats, heldout, adapter, _, _ = setup
    report = correct_lora(model, emulator, adapter, tmp_path / "c", heldout=heldout, calibration=stats)
    for row in report.rows:
        assert 0 < row["init_overlap"] <= 1 + 1e-9 and 0 <= row["data_overlap"] <= 1 + 1e-9
        assert 0 <= row["correction_share"] < 1
    naive = {r["name"]: r["correction_share"] for r in report.rows_at(0.0)}
    assert set(naive.values()) == {0.0}  # L = 0: the adapter is the LoRA alone
    full = report.rows_at(math.inf)
    assert all(r["correction_share"] >= report.layer(r["name"])["correction_share"] - 1e-12 for r in full)


def test_eigen_init_starts_on_the_top_eigenvectors_and_changes_nothing(setup):
    model, tok, _, stats, _, _, prompts, _ = setup
    batch = batches(tok, _toy(prompts[:4]).train, batch_size=4)[0]
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    peft_model = attach_lora(model, LoraSpec(r=3, alpha=6, init="eigen"), stats=stats)
    try:
        with torch.no_grad():
            after = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(before, after)  # B = 0
        for name, (a, _, _) in lora_factors(peft_model).items():
            top = torch.linalg.eigh(stats.layer(name).covariance)[1][:, -3:]
            cos = torch.linalg.svdvals(torch.linalg.qr(a.double().T)[0].T @ top)
            assert cos.min() > 1 - 1e-4
            assert a.norm(dim=1) == pytest.approx(torch.full((3,), 3**-0.5), rel=1e-5)
    finally:
        peft_model.unload()


def test_label_prior_gives_the_original_the_training_labels_shares(setup, tmp_path):
    """Through the files and stock peft: with the label target, the original + corrected adapter's mean
    probabilities of the choices' first tokens split their mass in the training answers' shares, and the
    rest of the answer distribution keeps its mass."""
    model, tok, emulator, _, heldout, adapter, prompts, _ = setup
    shares = {"yes": 0.3, "no": 0.7}
    report = correct_lora(
        model,
        emulator,
        adapter,
        tmp_path / "c",
        heldout=heldout,
        prior_prompts=prompts,
        tokenizer=tok,
        label_shares=shares,
    )
    assert report.prior["target_kind"] == "labels"
    ids = answer_tokens(tok, prompts[0], list(shares))
    corrected = PeftModel.from_pretrained(model, str(tmp_path / "c"))
    got = _mean_answer_distribution(corrected, tok, prompts)
    corrected.unload()
    mass = got[ids]
    assert (mass / mass.sum()).tolist() == pytest.approx([0.3, 0.7], abs=1e-4)
    plain = load_adapter(model, tmp_path / "c", check_base=False)  # the same LoRA, read through emloc_nb
    assert _mean_answer_distribution(plain, tok, prompts)[ids].tolist() == pytest.approx(mass.tolist(), rel=1e-5)
    plain.unload()


def test_label_target_moves_only_the_split_between_the_choices():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 20, bias=False)
    states = torch.randn(30, 8, generator=g)
    with torch.no_grad():
        mean = head(states).double().softmax(-1).mean(0)
    target = label_target(states, head, [3, 7], [1.0, 3.0])
    assert float(target.sum()) == pytest.approx(1.0)
    assert float(target[[3, 7]].sum()) == pytest.approx(float(mean[[3, 7]].sum()))
    assert float(target[7] / target[3]) == pytest.approx(3.0)
    others = [i for i in range(20) if i not in (3, 7)]
    assert torch.equal(target[others], mean[others])


@pytest.mark.parametrize("shares", [{"yes": 1.0}, {"yes": 0.5, "no": 0.0}, {"yes": float("nan"), "no": 0.5}])
def test_bad_label_shares_are_refused_before_any_work(setup, tmp_path, shares):
    model, tok, emulator, _, _, adapter, prompts, _ = setup
    with pytest.raises(EmlocError, match="positive share"):
        correct_lora(
            model, emulator, adapter, tmp_path / "c", prior_prompts=prompts, tokenizer=tok, label_shares=shares
        )
    assert not (tmp_path / "c").exists()


def test_the_prior_target_follows_the_task():
    assert resolve_prior_target("auto", has_choices=True) == "labels"
    assert resolve_prior_target("auto", has_choices=False) == "emulator"
    assert resolve_prior_target("emulator", has_choices=True) == "emulator"
    with pytest.raises(EmlocError, match="prior_target: emulator"):
        resolve_prior_target("labels", has_choices=False)


def test_choice_shares_count_the_training_answers_and_refuse_a_missing_class(toy_task):
    shares = toy_task.choice_shares()
    answers = list(toy_task.train["answer"])
    assert shares == {c: answers.count(c) / len(answers) for c in toy_task.choices}
    lopsided = _toy([[{"role": "user", "content": "x"}]] * 2)  # one "no", one "yes"
    assert lopsided.choice_shares() == {"no": 0.5, "yes": 0.5}
    only_no = type(lopsided)("t", lopsided.train.select([0]), lopsided.train, lopsided.train, choices=["no", "yes"])
    with pytest.raises(EmlocError, match=r"\['yes'\] never occur"):
        only_no.choice_shares()


def test_choices_must_start_with_distinct_tokens(setup):
    _, tok, *_ = setup
    prompt = [{"role": "user", "content": "Is it good?"}]
    assert len(set(answer_tokens(tok, prompt, ["yes", "no"]))) == 2
    with pytest.raises(EmlocError, match="distinct tokens"):
        answer_tokens(tok, prompt, ["yes", "yes indeed"])
