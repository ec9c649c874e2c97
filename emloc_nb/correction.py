"""LoRA correction: move a LoRA trained on the emulator onto the original (EMLoC's Algorithm 1, and more).

The LoRA ΔW = s · B A was fitted on top of W_E, not W. On the LoRA's input subspace
span(U_A), with Aᵀ = U_A Σ_A V_Aᵀ, we re-parametrise ΔW = B' A' (A' = U_Aᵀ,
B' = s · B V_A Σ_A) and subtract the original-vs-emulator discrepancy on that basis,
D = (W − W_E) U_A, clamped per column:

    κ_i = min(1, L · mean|B'_{:,i}| / mean|D_{:,i}|),   B_c = B' − D diag(κ),   A_c = A'.

With no clamp, (W + B_c A_c) x = (W_E + ΔW) x for x in span(U_A), and = W x for x ⊥ span(U_A).
The result is a standard peft adapter for the original model with the scaling folded in
(lora_alpha = r). Directions where A is zero are not in the LoRA's subspace and get no
correction, so a zero LoRA stays zero. L = 0 is the naive transfer, L = inf no clamp.

Beyond the paper:
- `kappa="lstsq"`: the κ that minimises the held-out error against the fine-tuned emulator
  (a closed form from the same quadratic terms the report stores), instead of the clamp.
- The prior correction: the emulator's drift biases its answers, the LoRA learns to undo
  that bias, and on the original the undoing overshoots into a bias of its own. A rank-1
  LoRA on the output layer, ΔW_out = b aᵀ with a·h ≈ 1 at the answer position, adds the
  logit offset b that gives the original + corrected LoRA a target mean answer distribution
  over the (unlabelled) calibration prompts. It ships in the adapter. The target is either
  the training answers' class shares (a model fitted by maximum likelihood with a free
  output bias predicts, on average over its training prompts, the class shares of its
  labels; the transfer loses that and this restores it), or the fine-tuned emulator's own
  mean answer distribution (for generation tasks, which have no classes).
- The placebo: the same correction on a random subspace of the LoRA's rank, to tell a gain
  of the correction from a mere shift of the answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn
from transformers.pytorch_utils import Conv1D

from .artifacts import FORMAT_VERSION, atomic_dir, check_fingerprint, read_tensors, write_json, write_tensors
from .calibration import CalibrationStats
from .config import CLAMP, check_value
from .data import IGNORE_INDEX, encode_example
from .drift import output_energy
from .emulator import Emulator
from .errors import EmlocError
from .lora import INITIAL_A_FILE, load_adapter, lora_factors
from .measure import phase
from .models import block_index, fingerprint, linear_weight, module_name
from .progress import progress as progress_bar
from .reports import LayerReport
from .scoring import answer_states

_NULL_TOL = 1e-6  # singular values of A below this share of the largest span no LoRA direction


@dataclass
class LayerCorrection:
    """The corrected factors of one layer and what is needed to report on them."""

    a: torch.Tensor  # A_c = U_Aᵀ, (r, d_in)
    b: torch.Tensor  # B_c, (d_out, r)
    kappa: torch.Tensor  # (r,) clamp factors; 0 outside the LoRA's subspace
    b_mean: torch.Tensor  # mean|B'_{:,i}|
    d_mean: torch.Tensor  # mean|D_{:,i}|
    d: torch.Tensor  # D = (W − W_E) U_A
    b_prime: torch.Tensor  # B'
    valid: torch.Tensor  # bool (r,): directions inside the LoRA's input subspace


def clamp_factors(b_mean: torch.Tensor, d_mean: torch.Tensor, clamp: float) -> torch.Tensor:
    """κ_i = min(1, L · mean|B'_i| / mean|D_i|); a zero column of D needs no clamp (κ = 1)."""
    if math.isinf(clamp):
        return torch.ones_like(b_mean)
    ratio = clamp * b_mean / d_mean.clamp_min(torch.finfo(d_mean.dtype).tiny)
    return torch.where(d_mean > 0, ratio.clamp(max=1.0), torch.ones_like(ratio))


def correct_layer(
    w: torch.Tensor, w_e: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, clamp: float = 3.0
) -> LayerCorrection:
    """Algorithm 1 for one layer, in float64: W (d_out, d_in), W_E, A (r, d_in), B (d_out, r), ΔW = s·B A."""
    w, w_e, a, b = (t.detach().double().cpu() for t in (w, w_e, a, b))
    u_a, sigma, v_at = torch.linalg.svd(a.T, full_matrices=False)  # Aᵀ = U_A Σ_A V_Aᵀ
    valid = sigma > _NULL_TOL * sigma.max() if sigma.max() > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    b_prime = scaling * b @ v_at.T * sigma  # s · B V_A Σ_A
    d = (w - w_e) @ u_a
    b_mean, d_mean = b_prime.abs().mean(0), d.abs().mean(0)
    kappa = clamp_factors(b_mean, d_mean, clamp) * valid
    return LayerCorrection(u_a.T.contiguous(), b_prime - d * kappa, kappa, b_mean, d_mean, d, b_prime, valid)


def error_terms(
    w: torch.Tensor, w_e: torch.Tensor, lc: LayerCorrection, covariance: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Quadratic-form terms giving, for any κ, the error against the fine-tuned emulator on held-out inputs.

    With Δ = W − W_E, U = U_A (valid columns) and C the held-out E[x xᵀ]:
      overall²  = tr(ΔCΔᵀ) − 2 κ·m + κᵀ Q κ,       m_i = ⟨(Δ C U)_i, D_i⟩,  Q = (UᵀCU) ∘ (DᵀD)
      subspace² = (1−κ)ᵀ Q (1−κ)                   (inputs projected onto span(U))
    and the reference norms of the fine-tuned emulator's output, overall and on the subspace.
    """
    c = covariance.double()
    w, w_e = w.detach().double().cpu(), w_e.detach().double().cpu()
    delta = w - w_e
    u = lc.a.T[:, lc.valid]
    d = lc.d[:, lc.valid]
    cu = c @ u
    tuned = w_e + lc.b_prime[:, lc.valid] @ u.T  # W_E + ΔW (ΔW lives on the valid directions)
    return {
        "a": output_energy(delta, c),
        "m": ((delta @ cu) * d).sum(0),
        "q": (u.T @ cu) * (d.T @ d),
        "ref_all": output_energy(tuned, c),
        "ref_sub": output_energy(tuned @ u, u.T @ cu),
    }


def _errors(terms: dict[str, torch.Tensor], kappa: torch.Tensor) -> tuple[float, float]:
    q = terms["q"]
    k = kappa.double()
    overall = float(terms["a"] - 2 * k @ terms["m"] + k @ q @ k)
    sub = float((1 - k) @ q @ (1 - k))

    def rel(sq, ref):
        return math.sqrt(max(sq, 0.0) / float(ref)) if float(ref) > 0 else 0.0

    return rel(overall, terms["ref_all"]), rel(sub, terms["ref_sub"])


def lstsq_kappa(terms: dict[str, torch.Tensor], rtol: float = 1e-10) -> torch.Tensor:
    """κ minimising the held-out error tr(ΔCΔᵀ) − 2κ·m + κᵀQκ: the least-norm solution of Q κ = m.

    Directions Q cannot tell apart (a layer kept dense has D = 0, so Q = 0) get κ = 0.
    """
    return torch.linalg.pinv(terms["q"], rtol=rtol, hermitian=True) @ terms["m"]


def subspace_cosines(u: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(u) and span(other) (columns), largest first."""
    qu, _ = torch.linalg.qr(u.double())
    qo, _ = torch.linalg.qr(other.double())
    return torch.linalg.svdvals(qu.T @ qo).clamp(0, 1)


def placebo_layer(
    w: torch.Tensor, w_e: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, clamp: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The placebo: ΔW kept, and the clamped correction applied on a random subspace of the LoRA's rank.

    Returns (A, B) of rank 2r: [U_Aᵀ; Rᵀ] and [B', −(W − W_E) R diag(κ)], with R random orthonormal.
    """
    lc = correct_layer(w, w_e, a, b, scaling, clamp=0.0)
    g = torch.Generator().manual_seed(seed)
    r, _ = torch.linalg.qr(torch.randn(w.shape[1], a.shape[0], generator=g, dtype=torch.float64))
    d = (w.detach().double().cpu() - w_e.detach().double().cpu()) @ r
    kappa = clamp_factors(lc.b_mean, d.abs().mean(0), clamp)
    return torch.cat([lc.a, r.T]), torch.cat([lc.b_prime, -d * kappa], dim=1)


# ----------------------------------------------------------------------------- the prior correction


@dataclass
class PriorFit:
    """The prior correction's logit offset and what it did, on the tokens it acts on (its support)."""

    token_ids: list[int]
    tokens: list[str]  # the support tokens as text
    bias: list[float]  # logit offset per support token
    target: list[float]  # the target mean probability of each support token
    before: list[float]  # the original + corrected LoRA's, without the offset
    after: list[float]  # and with it
    spread: float  # std over the prompts of a·h (1 ± spread: how constant the rank-1 offset is)
    direction: torch.Tensor = field(repr=False)  # a, (d,)
    target_kind: str = "emulator"  # whose mean distribution the target is: "labels" or "emulator"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "direction"}


def fit_prior(
    states: torch.Tensor,
    head: nn.Module,
    target: torch.Tensor,
    *,
    tokenizer=None,
    min_prob: float = 1e-3,
    steps: int = 200,
    tol: float = 1e-7,
) -> PriorFit:
    """The offset b on the support tokens such that softmax(head(h) + b a·h), averaged over `states`, matches `target`.

    `target` is a mean next-token distribution over the same prompts (`label_target` or the
    fine-tuned emulator's); the support is every token either side gives at least `min_prob` on average.
    """
    with torch.no_grad():
        logits = head(states.to(head.weight.dtype)).double()
    target = target.double()
    mean = states.double().mean(0)
    direction = mean / mean.dot(mean)
    t = states.double() @ direction  # ≈ 1: the rank-1 LoRA's gain at each prompt
    before = logits.softmax(-1).mean(0)
    support = ((before >= min_prob) | (target >= min_prob)).nonzero().flatten()
    b = torch.zeros(len(support), dtype=torch.float64)
    for _ in range(steps):  # iterative proportional fitting of the mean distribution on the support
        shifted = logits.clone()
        shifted[:, support] += t[:, None] * b
        p = shifted.softmax(-1).mean(0)[support]
        step = p.log() - target[support].clamp_min(1e-30).log()
        b -= step
        if float(step.abs().max()) < tol:
            break
    shifted = logits.clone()
    shifted[:, support] += t[:, None] * b
    after = shifted.softmax(-1).mean(0)
    ids = support.tolist()
    return PriorFit(
        ids,
        [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids],
        b.tolist(),
        target[support].tolist(),
        before[support].tolist(),
        after[support].tolist(),
        float(t.std()) if len(t) > 1 else 0.0,
        direction.float(),
    )


def answer_tokens(tokenizer, prompt: list[dict], choices: list[str]) -> list[int]:
    """The token each choice's answer starts with after `prompt`; they must differ to tell the choices apart."""
    ids = []
    for choice in choices:
        enc = encode_example(tokenizer, prompt, choice)
        n_prompt = enc["labels"].count(IGNORE_INDEX)
        ids.append(enc["input_ids"][n_prompt] if len(enc["input_ids"]) > n_prompt else None)
    if None in ids or len(set(ids)) < len(ids):
        raise EmlocError(
            f"The choices {choices} do not start with distinct tokens, so no class prior can be fitted on the first "
            "answer token. Set correction.prior_target: emulator."
        )
    return ids


def label_target(states: torch.Tensor, head: nn.Module, token_ids: list[int], shares: list[float]) -> torch.Tensor:
    """The mean next-token distribution of `states` with its mass on the choices' tokens re-split by `shares`."""
    with torch.no_grad():
        mean = head(states.to(head.weight.dtype)).double().softmax(-1).mean(0)
    target = mean.clone()
    ids = torch.tensor(token_ids)
    target[ids] = mean[ids].sum() * torch.tensor(shares, dtype=torch.float64) / sum(shares)
    return target


def prior_tensors(fit: PriorFit, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-1 LoRA (A = aᵀ, B = b on the support) that adds the offset to the output layer."""
    b = torch.zeros(head.weight.shape[0], 1)
    b[fit.token_ids, 0] = torch.tensor(fit.bias, dtype=b.dtype)
    return fit.direction[None, :].clone(), b


# ----------------------------------------------------------------------------- the report


@dataclass
class CorrectionReport(LayerReport):
    """Per layer: ‖D‖, κ, clamped columns, the correction's share of the adapter, the LoRA subspace's
    overlap with its initialisation and with the input's top eigenvectors, and the error against the
    fine-tuned emulator before/after; plus the prior correction, if any.

    `layers` holds what does not depend on L and `stats` the stored terms; `rows` is the layer table
    as the adapter was written (its own κ), and `rows_at(L)` the table for the paper's clamp at any L,
    both computed from those alone.
    """

    kind = "correction"

    clamp: float
    layers: list[dict]  # name, block, kind, lora_rank, scaling, d_norm, b_norm, init_overlap, data_overlap
    stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # per layer: see correct_lora
    kappa_mode: str = "clamp"
    prior: dict | None = None  # PriorFit.to_dict(), when the adapter carries the prior correction

    @cached_property
    def rows(self) -> list[dict]:
        return [self._row(row, self.stats[row["name"]]["kappa"]) for row in self.layers]

    def kappa_at(self, name: str, clamp: float) -> torch.Tensor:
        """The paper's κ of layer `name` at clamp L."""
        s = self.stats[name]
        return clamp_factors(s["b_mean"], s["d_mean"], clamp) * s["valid"]

    def errors_at(self, name: str, clamp: float) -> dict:
        """Relative error against the fine-tuned emulator for any L (L = 0: the naive transfer)."""
        return self._errors(name, self.kappa_at(name, clamp))

    def _errors(self, name: str, kappa: torch.Tensor) -> dict:
        s = self.stats[name]
        if "q" not in s:
            raise EmlocError("This report has no held-out statistics. Pass heldout= to correct_lora to get errors.")
        overall, sub = _errors(s, kappa[s["valid"].bool()])
        return {"error_all": overall, "error_subspace": sub}

    def rows_at(self, clamp: float) -> list[dict]:
        """The layer table for the paper's clamp at any L ("before" is the naive transfer, L = 0)."""
        return [self._row(row, self.kappa_at(row["name"], clamp)) for row in self.layers]

    def _row(self, row: dict, kappa: torch.Tensor) -> dict:
        s = self.stats[row["name"]]
        valid = s["valid"].bool()
        correction = float((s["d_norm2"] * kappa.double() ** 2).sum().sqrt())
        new = {
            **row,
            "clamped": int((kappa[valid] < 1).sum()),
            "kappa_mean": float(kappa[valid].mean()) if valid.any() else 0.0,
            # how much of the corrected adapter is the correction −Dκ rather than the LoRA B′
            "correction_share": correction / (correction + row["b_norm"]) if correction + row["b_norm"] > 0 else 0.0,
        }
        if "q" in s:
            before, after = self._errors(row["name"], torch.zeros_like(kappa)), self._errors(row["name"], kappa)
            new.update(
                before_all=before["error_all"],
                before_subspace=before["error_subspace"],
                after_all=after["error_all"],
                after_subspace=after["error_subspace"],
            )
        return new

    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.stats

    def _config(self) -> dict:
        return {"clamp": self.clamp, "kappa": self.kappa_mode, "prior": self.prior is not None}

    def prior_error(self) -> float | None:
        """The largest gap between the corrected model's mean prior and its target on the support; None: no prior."""
        if self.prior is None:
            return None
        return max(abs(a - t) for a, t in zip(self.prior["after"], self.prior["target"], strict=True))

    def _metadata(self) -> dict:
        return {"clamp": self.clamp, "kappa_mode": self.kappa_mode, "layers": self.layers, "prior": self.prior}

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> CorrectionReport:
        return cls(meta["clamp"], meta["layers"], tensors, meta["kappa_mode"], meta["prior"])


# ----------------------------------------------------------------------------- the corrected adapter


def _check_adapter(peft_emulator, factors: dict, adapter_dir) -> str:
    """Refuse adapter content the correction cannot carry over; return its task type.

    load_adapter has refused DoRA, trained biases and modules_to_save already (peft defaults only).
    """
    config = peft_emulator.peft_config[peft_emulator.active_adapter]
    trained = {
        n.removeprefix("base_model.model.").split(".lora_")[0]
        for n, _ in peft_emulator.named_parameters()
        if ".lora_" in n
    }
    if trained - set(factors):
        raise EmlocError(
            f"The adapter at {adapter_dir} puts LoRA on non-linear layers {sorted(trained - set(factors))[:3]}, "
            "which the correction cannot carry over to the original. Train a plain LoRA on linear layers instead."
        )
    return config.task_type


def _write_adapter(path: Path, tensors: dict, ranks: dict[str, int], task_type, fan_in_fan_out: bool) -> None:
    """A standard peft adapter with the scaling folded in (lora_alpha = r for every layer)."""
    r = max(ranks.values())
    LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        use_rslora=False,
        lora_dropout=0.0,
        bias="none",
        task_type=task_type,
        fan_in_fan_out=fan_in_fan_out,
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: k for n, k in ranks.items() if k != r},
    ).save_pretrained(str(path))
    write_tensors(path / "adapter_model.safetensors", tensors)


def _top_eigenvectors(calibration: CalibrationStats, name: str, r: int, cache: dict) -> torch.Tensor:
    key = calibration.key_for(name)
    if key not in cache:  # layers that share an input share its eigenvectors
        cache.clear()
        cache[key] = torch.linalg.eigh(calibration.layer(name).covariance.float())[1].flip(1)
    return cache[key][:, :r]


@torch.no_grad()
@phase("correction")
def correct_lora(
    original: nn.Module,
    emulator: Emulator,
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    clamp: float = 3.0,
    kappa: str = "clamp",
    heldout: CalibrationStats | None = None,
    calibration: CalibrationStats | None = None,
    prior_prompts: list[list[dict]] | None = None,
    tokenizer=None,
    label_shares: dict[str, float] | None = None,
    placebo_seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CorrectionReport:
    """Write a corrected, standard peft adapter for `original` to `output_dir`; return the report.

    `adapter_dir` must hold a LoRA trained on this `emulator`, which must have been
    built from `original` (both are checked by fingerprint).
    - `heldout`: statistics of the original's layer inputs on held-out examples; adds the
      before/after errors, and is what `kappa="lstsq"` minimises the error on.
    - `calibration`: the statistics the emulator was built from; adds each LoRA subspace's
      overlap with its input's top eigenvectors.
    - `prior_prompts` (with `tokenizer`): unlabelled prompts on which the prior correction is fitted.
      Its target: `label_shares` (choice -> share of the training answers), or without them the
      fine-tuned emulator's mean answer distribution.
    - `placebo_seed`: write the placebo instead (the correction on a random subspace).
    """
    clamp = check_value(clamp, float, "clamp", CLAMP)
    kappa = check_value(kappa, str, "kappa", {"choices": ("clamp", "lstsq")})
    if kappa == "lstsq" and heldout is None:
        raise EmlocError("kappa='lstsq' minimises the error on held-out inputs: pass heldout= (their statistics).")
    if prior_prompts is not None and (tokenizer is None or not prior_prompts):
        raise EmlocError("The prior correction needs prompts and their tokenizer: pass prior_prompts= and tokenizer=.")
    if label_shares is not None and prior_prompts is None:
        raise EmlocError("label_shares sets the prior correction's target: pass prior_prompts= (and tokenizer=) too.")
    if label_shares is not None and (
        len(label_shares) < 2
        or not all(isinstance(v, (int, float)) and 0 < v < math.inf for v in label_shares.values())
    ):
        raise EmlocError(
            f"label_shares={label_shares!r} must give each of two or more choices a positive share, "
            "e.g. Task.choice_shares()."
        )
    choice_ids = answer_tokens(tokenizer, prior_prompts[0], list(label_shares)) if label_shares is not None else None
    original_fp = fingerprint(original)
    check_fingerprint(emulator.original_fingerprint, original_fp, artifact="The emulator", model="the original model")
    for what, stats in (("held-out", heldout), ("calibration", calibration)):
        if stats is not None:
            check_fingerprint(
                stats.model_fingerprint, original_fp, artifact=f"The {what} statistics", model="the original model"
            )
    adapter_dir = Path(adapter_dir)
    peft_emulator = load_adapter(emulator.model, adapter_dir)  # refuses an adapter trained on another base
    try:
        factors = lora_factors(peft_emulator)
        task_type = _check_adapter(peft_emulator, factors, adapter_dir)
        target = None
        if prior_prompts is not None and label_shares is None:  # the fine-tuned emulator's mean answer distribution
            states = answer_states(peft_emulator, tokenizer, prior_prompts)
            head = peft_emulator.get_output_embeddings()
            target = head(states.to(head.weight.dtype)).double().softmax(-1).mean(0)
    finally:
        peft_emulator.unload()
    initial = read_tensors(adapter_dir / INITIAL_A_FILE) if (adapter_dir / INITIAL_A_FILE).is_file() else {}
    originals, emulated = dict(original.named_modules()), dict(emulator.model.named_modules())

    tensors, rows, stats, ranks, eig_cache = {}, [], {}, {}, {}
    for i, (name, (a, b, s)) in enumerate(
        progress_bar(factors.items(), desc="correction", total=len(factors), enabled=progress)
    ):
        if name not in originals:
            raise EmlocError(
                f"The adapter targets {name}, which the original model lacks. Correct it against the "
                "original model its emulator was built from."
            )
        w, w_e = linear_weight(originals[name]), linear_weight(emulated[name])
        if tuple(w.shape) != (b.shape[0], a.shape[1]) or w.shape != w_e.shape:
            raise EmlocError(
                f"Shapes disagree at {name}: W {tuple(w.shape)}, W_E {tuple(w_e.shape)}, "
                f"B·A {(b.shape[0], a.shape[1])}. The adapter does not belong to this model."
            )
        if not (torch.isfinite(w).all() and torch.isfinite(w_e).all()):
            raise EmlocError(
                f"The {'original' if not torch.isfinite(w).all() else 'emulator'} weights of {name} are not finite "
                "(NaN/Inf). Reload the model in float32, or rebuild the emulator."
            )
        lc = correct_layer(w, w_e, a, b, s, clamp)
        layer_stats = {"b_mean": lc.b_mean, "d_mean": lc.d_mean, "valid": lc.valid, "d_norm2": (lc.d**2).sum(0)}
        if heldout is not None:
            layer_stats.update(error_terms(w, w_e, lc, heldout.layer(name).covariance))
        if kappa == "lstsq":  # replaces the clamp's κ on the valid directions
            lc.kappa = torch.zeros_like(lc.kappa)
            lc.kappa[lc.valid] = lstsq_kappa(layer_stats)
            lc.b = lc.b_prime - lc.d * lc.kappa
        layer_stats["kappa"] = lc.kappa
        a_c, b_c = (lc.a, lc.b) if placebo_seed is None else placebo_layer(w, w_e, a, b, s, clamp, placebo_seed + i)
        u = lc.a.T[:, lc.valid]
        overlap = {"init_overlap": float("nan"), "data_overlap": float("nan")}
        if name in initial and u.shape[1]:
            layer_stats["init_cos"] = subspace_cosines(u, initial[name].T)
        if calibration is not None and u.shape[1]:
            layer_stats["data_cos"] = subspace_cosines(u, _top_eigenvectors(calibration, name, a.shape[0], eig_cache))
        for key in ("init", "data"):
            if f"{key}_cos" in layer_stats:  # mean cos² of the principal angles: 1 = the same subspace
                overlap[f"{key}_overlap"] = float((layer_stats[f"{key}_cos"] ** 2).mean())
        if not (torch.isfinite(a_c).all() and torch.isfinite(b_c).all()):
            raise EmlocError(
                f"The corrected LoRA of {name} is not finite (NaN/Inf). Check the adapter and the emulator."
            )
        # LoRA weights stay at least float32, as trained over 16-bit frozen weights (peft keeps them so)
        dtype = torch.promote_types(originals[name].weight.dtype, torch.float32)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_c.to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_c.to(dtype)
        ranks[name] = a_c.shape[0]
        stats[name] = layer_stats
        rows.append(
            {
                "name": name,
                "block": block_index(name),
                "kind": name.rsplit(".", 1)[-1],
                "lora_rank": a.shape[0],
                "scaling": s,
                "d_norm": float(lc.d.norm()),
                "b_norm": float(lc.b_prime.norm()),
                **overlap,
            }
        )

    fan_in_fan_out = any(isinstance(originals[n], Conv1D) for n in ranks)
    prior = None
    with atomic_dir(
        output_dir,
        overwrite=overwrite,
        kind="corrected_adapter",
        model_fingerprint=original_fp,
        config={
            "clamp": clamp,
            "kappa": kappa,
            "prior": prior_prompts is not None,
            "label_shares": label_shares,
            "placebo_seed": placebo_seed,
        },
    ) as tmp:
        _write_adapter(tmp, tensors, ranks, task_type, fan_in_fan_out)
        if prior_prompts is not None:  # fitted on the original with the layer-corrected LoRA just written
            corrected = load_adapter(original, tmp, check_base=False, manifest=False)
            try:
                states = answer_states(corrected, tokenizer, prior_prompts)
            finally:
                corrected.unload()
            head = original.get_output_embeddings()
            if label_shares is not None:
                target = label_target(states, head, choice_ids, list(label_shares.values()))
            prior = fit_prior(states, head, target, tokenizer=tokenizer)
            prior.target_kind = "labels" if label_shares is not None else "emulator"
            head_name = module_name(original, head)
            a_p, b_p = prior_tensors(prior, head)
            if not (torch.isfinite(a_p).all() and torch.isfinite(b_p).all()):
                raise EmlocError(
                    "The prior correction is not finite (NaN/Inf). Check the adapter and the calibration prompts, "
                    "or set correction.prior=false."
                )
            dtype = torch.promote_types(head.weight.dtype, torch.float32)
            tensors[f"base_model.model.{head_name}.lora_A.weight"] = a_p.to(dtype)
            tensors[f"base_model.model.{head_name}.lora_B.weight"] = b_p.to(dtype)
            _write_adapter(tmp, tensors, {**ranks, head_name: 1}, task_type, fan_in_fan_out)
        write_json(
            tmp / "emloc.json",
            {
                "format_version": FORMAT_VERSION,
                "kind": "corrected_adapter",
                "base_fingerprint": original_fp,
                "emulator_fingerprint": emulator.fingerprint,
                "clamp": clamp,
                "kappa": kappa,
                "prior": prior is not None,
                "prior_target": prior.target_kind if prior is not None else None,
                "placebo_seed": placebo_seed,
                "source_adapter": str(adapter_dir),
            },
        )
    return CorrectionReport(clamp, rows, stats, kappa, prior.to_dict() if prior is not None else None)
