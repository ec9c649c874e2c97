"""EMLoC's Algorithm 1 for one layer: a LoRA fitted on the emulator's W_E, corrected for the original's W.

The LoRA ΔW = s · B A was fitted on top of W_E, not W. On the LoRA's input subspace
span(U_A), with Aᵀ = U_A Σ_A V_Aᵀ, we re-parametrise ΔW = B' A' (A' = U_Aᵀ,
B' = s · B V_A Σ_A) and subtract the original-vs-emulator discrepancy on that basis,
D = (W − W_E) U_A, clamped per column:

    κ_i = min(1, L · mean|B'_{:,i}| / mean|D_{:,i}|),   B_c = B' − D diag(κ),   A_c = A'.

With no clamp, (W + B_c A_c) x = (W_E + ΔW) x for x in span(U_A), and = W x for x ⊥ span(U_A).
Directions where A is zero are not in the LoRA's subspace and get no correction, so a zero
LoRA stays zero. L = 0 is the naive transfer, L = inf no clamp.

Beyond the paper:
- `lstsq_kappa`: the κ that minimises the held-out error against the fine-tuned emulator
  (a closed form from the quadratic terms of `error_terms`), instead of the clamp.
- `placebo_layer`: the same correction on a random subspace of the LoRA's rank, to tell a gain
  of the correction from a mere shift of the answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .emulator_drift import output_energy

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


def kappa_errors(terms: dict[str, torch.Tensor], kappa: torch.Tensor) -> tuple[float, float]:
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
