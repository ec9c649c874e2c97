"""Factoring one layer: activation-aware (whitened) truncated SVD, and the rank-r layer that replaces it.

For a layer y = W x + b whose inputs have second moment C = S Sᵀ, E‖W x‖² = ‖W S‖_F²,
so the best rank-r approximation in that metric keeps the top r singular triplets of
W S = U Σ Vᵀ:

    W_E = U_r Σ_r V_rᵀ S⁻¹,  stored as  up = U_r Σ_r^½,  down = Σ_r^½ V_rᵀ S⁻¹.

Since W S = U Σ Vᵀ, the same down factor is Σ_r^-½ U_rᵀ W, which is how we compute
it: no inverse of S (ill-conditioned when some channels are nearly silent) is needed,
and a full rank reproduces W to float precision. And since W S Sᵀ Wᵀ = W C Wᵀ, U and Σ²
are the eigenvectors and eigenvalues of the output's second moment. Every whitened build factors
from these float64 Gram matrices, the smaller of W S's two (d_in² or d_out²), not from an SVD;
a layer wider in than out (down, k, v) can even be factored without its d_in × d_in input
moment (`output_moment`), which is what the streamed build that keeps no statistics does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .calibration import CalibrationStats
from .errors import EmlocError
from .structure import block_index, linear_bias, linear_weight

MODES = ("whitened", "plain")


class LowRankLinear(nn.Module):
    """y = up(down(x)) + b: a rank-r stand-in for a dense linear layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """W_E = up · down, shape (out_features, in_features), in float64.

        Rounding the product to a 16-bit dtype would add noise the forward up(down(x)) never
        has, comparable to the truncation error that drift and correction measure.
        """
        return self.up.weight.double() @ self.down.weight.double()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def whitening(covariance: torch.Tensor, eps: float = 1e-6, *, overwrite: bool = False) -> tuple[torch.Tensor, str]:
    """S with S Sᵀ = C + εI, and how it was found.

    Cholesky of C + εI with ε relative to the mean eigenvalue; if C is not positive
    definite, more jitter, then eigh with eigenvalues clamped to a floor.
    `overwrite=True` lets it use `covariance` (float64) as its scratch space: at an
    8192-wide input that saves a 512 MB copy.
    """
    c = covariance.double()
    if c is covariance and not overwrite:
        c = c.clone()
    diagonal = c.diagonal().clone()
    scale = float(diagonal.mean()) or 1.0
    # The jitter goes on the diagonal: no identity matrix and no temporaries.
    for jitter in (eps, eps * 1e2, eps * 1e4):
        c.diagonal().copy_(diagonal + jitter * scale)
        s, info = torch.linalg.cholesky_ex(c)
        if info == 0:
            return s, "cholesky" if jitter == eps else f"cholesky+jitter {jitter:g}"
        del s
    c.diagonal().copy_(diagonal)
    lam, q = torch.linalg.eigh(c)
    floor = eps * max(float(lam.abs().max()), abs(scale), 1e-30)
    return q * lam.clamp_min(floor).sqrt(), "eigh"


def check_whitening(eps: float, shrinkage: float) -> None:
    """The jitter ε and the shrinkage λ of a build, refused before any work: a NaN in either gives a NaN emulator."""
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise EmlocError(f"eps={eps!r} must be a finite number > 0 (1e-6 is the usual jitter).")
    if not (isinstance(shrinkage, int | float) and math.isfinite(shrinkage) and shrinkage >= 0):
        raise EmlocError(f"shrinkage={shrinkage!r} must be a finite number ≥ 0 (0: whiten with C itself).")


_SLAB = 1024  # rows or columns of a weight converted to float64 at a time by the Gram route


def output_moment(
    weight: torch.Tensor,
    moment: torch.Tensor,
    input_squares: torch.Tensor,
    tokens: int,
    eps: float = 1e-6,
    shrinkage: float = 0.0,
) -> torch.Tensor:
    """W C' Wᵀ in float64, from `moment` = Σ (W x)(W x)ᵀ and `input_squares` = Σ x² per channel over `tokens`.

    C' is the matrix the in-memory build whitens with (Whiteners, then `whitening`'s first try):
    C + λ·diag(C) + ε·mean(diag(C + λ·diag C))·I. Its eigenvectors are the U of W S, its eigenvalues Σ².
    """
    w = weight.detach()
    t = max(tokens, 1)
    diagonal = input_squares.double().to(w.device) / t
    scale = float(diagonal.mean()) * (1 + shrinkage) or 1.0
    extra = shrinkage * diagonal + eps * scale  # W · diag(extra) · Wᵀ, a slab of input columns at a time
    m = moment.double().to(w.device) / t
    for j in range(0, w.shape[1], _SLAB):
        part = w[:, j : j + _SLAB].double()
        m += (part * extra[j : j + _SLAB]) @ part.T
    return m


def _gram_factors(
    weight: torch.Tensor, s: torch.Tensor | None, moment: torch.Tensor | None, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """σ(W), σ(W S) and the rank-r factors (up, down), from float64 eigen-decompositions of small Gram matrices.

    Never forms W S or a float64 copy of W (a slab at a time): for a layer no wider in than out
    the d_in² Gram (W S)ᵀ W S = Sᵀ WᵀW S gives V and Σ, so that up = W S V_r Σ_r^-½ and
    down = Σ_r^-½ U_rᵀ W = Σ_r^-1 (S V_r Σ_r^-½)ᵀ WᵀW; for one wider in than out, `moment`
    (W C' Wᵀ, the d_out² Gram W S (W S)ᵀ) gives U and Σ directly.
    """
    d_out, d_in = weight.shape
    if moment is not None:  # wider in than out: everything is d_out²
        gram_w = torch.zeros(d_out, d_out, dtype=torch.float64, device=weight.device)
        for j in range(0, d_in, _SLAB):
            part = weight[:, j : j + _SLAB].double()
            gram_w += part @ part.T
        white = moment.to(weight.device, torch.float64)
    else:
        gram_w = torch.zeros(d_in, d_in, dtype=torch.float64, device=weight.device)
        for i in range(0, d_out, _SLAB):
            part = weight[i : i + _SLAB].double()
            gram_w += part.T @ part
        white = s.T @ gram_w @ s
    sv_plain = torch.linalg.eigvalsh(gram_w).flip(0).clamp_min(0).sqrt()
    if rank is None:  # a dense layer: its spectra only
        return sv_plain, torch.linalg.eigvalsh(white).flip(0).clamp_min(0).sqrt(), None
    lam, q = torch.linalg.eigh(white)
    del white
    sv_white = lam.flip(0).clamp_min(0).sqrt()
    root = sv_white[:rank].sqrt().clamp_min(1e-30)
    basis = q.flip(1)[:, :rank]
    del lam, q
    if moment is not None:  # basis = U_r
        up = basis * root
        down = torch.empty(rank, d_in, dtype=torch.float64, device=weight.device)
        for j in range(0, d_in, _SLAB):
            down[:, j : j + _SLAB] = basis.T @ weight[:, j : j + _SLAB].double()
        down /= root[:, None]
    else:  # basis = V_r
        p = (s @ basis) / root  # S V_r Σ_r^-½
        up = torch.empty(d_out, rank, dtype=torch.float64, device=weight.device)
        for i in range(0, d_out, _SLAB):
            up[i : i + _SLAB] = weight[i : i + _SLAB].double() @ p
        down = p.T @ gram_w
        down /= (root**2)[:, None]
    return sv_plain, sv_white, (up, down)


def _output_gram(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(W S)(W S)ᵀ = W C' Wᵀ in float64, forming W S a slab of rows at a time (no float64 copy of W)."""
    ws = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
    for i in range(0, weight.shape[0], _SLAB):
        ws[i : i + _SLAB] = weight[i : i + _SLAB].double() @ s
    return ws @ ws.T


def _svdvals(m: torch.Tensor) -> torch.Tensor:
    """Singular values, largest first, from the float64 eigenvalues of the smaller Gram matrix.

    About twice as fast as a float32 SVD, and as accurate: each σ to about 1e-8 of the largest.
    """
    m = m.double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def _truncation_error(sv: torch.Tensor, rank: int) -> float:
    """The relative output error of keeping the top `rank` of the whitened singular values `sv`."""
    return float((sv[rank:] ** 2).sum().sqrt() / (sv**2).sum().sqrt())


class Whiteners:
    """S for each layer's input, computed once per shared input (layers sharing one are adjacent, so one is kept).

    `consume=True` turns each second moment into its covariance in place, for a caller that
    drops the statistics once the layer is factored (the streamed build): one copy fewer.
    """

    def __init__(self, stats: CalibrationStats | None, eps: float, shrinkage: float = 0.0, *, consume: bool = False):
        self.stats, self.eps, self.shrinkage, self.consume = stats, eps, shrinkage, consume
        self._key, self._value = None, None

    def get(self, name: str, device: torch.device | None = None) -> tuple[torch.Tensor, str] | None:
        if self.stats is None:
            return None
        key = self.stats.key_for(name)
        if key != self._key:
            self._key, self._value = None, None  # free the previous S before computing the next
            inputs = self.stats.inputs[key]
            c = inputs.second_moment.div_(max(inputs.tokens, 1)) if self.consume else inputs.covariance
            if self.shrinkage:  # C + λ·diag(C): less trust in barely seen directions
                c.diagonal().mul_(1 + self.shrinkage)
            c = c if device is None else c.to(device)
            self._key, self._value = key, whitening(c, self.eps, overwrite=True)
            if self.consume:  # its scratch space now; freed before the layer is factored
                inputs.second_moment = torch.empty(0, dtype=torch.float64)
        return self._value


def factor_layer(
    name: str,
    module: nn.Module,
    choice,
    whitener: tuple[torch.Tensor, str] | None,
    mode: str,
    *,
    moment: torch.Tensor | None = None,
) -> tuple[LowRankLinear | None, dict, dict]:
    """One layer of the emulator: its LowRankLinear (None: kept dense), its spectrum-table row and its spectra.

    Runs on the layer's device (factoring on the GPU when the model is there). Whitened mode
    factors from float64 Gram matrices (`_gram_factors`), never from an SVD of W S: from
    Sᵀ WᵀW S for a layer no wider in than out, and from the output's second moment W C' Wᵀ for
    one wider in than out, which is `moment` when given (the streamed build accumulates it
    from the layer's outputs, with no whitener) and (W S)(W S)ᵀ otherwise. Plain mode takes
    a float32 SVD of W.
    """
    if (mode == "whitened" and (whitener is None) == (moment is None)) or (mode != "whitened" and moment is not None):
        raise ValueError("whitened mode takes a whitener or else an output moment; plain mode no moment")
    w = linear_weight(module).detach()
    if not torch.isfinite(w).all():  # its factors would be NaN, or the solver would not converge
        raise EmlocError(
            f"The weight of {name} holds NaN or Inf: the model is damaged. Load it again from its checkpoint, "
            "and check that checkpoint's files."
        )
    up = down = None
    s, method = (None, "none") if whitener is None else (whitener[0].to(w.device), whitener[1])
    if mode == "whitened":
        if moment is not None:
            method = "output moment"
        elif w.shape[0] < w.shape[1]:  # the d_out² Gram of W S is the smaller one
            moment, s = _output_gram(w, s), None
        sv_plain, sv_white, factors = _gram_factors(w, s, moment, choice.rank)
        if factors is not None:
            up, down = factors
        error = 0.0 if choice.rank is None else _truncation_error(sv_white, choice.rank)
    else:  # the SVD baseline; with statistics, its spectrum and error in the whitened metric are reported too
        w64 = w.double()
        sv_plain = _svdvals(w64)
        ws = w64 @ s if s is not None else None
        sv_white = _svdvals(ws) if ws is not None else None
        error = 0.0 if choice.rank is None else math.nan
        if choice.rank is not None:
            r = choice.rank
            u, sv, _ = torch.linalg.svd(w.float(), full_matrices=False)  # float32 is plenty for the factors
            u, sv = u[:, :r].double(), sv.double()  # only the kept columns in float64
            up = u * sv[:r].sqrt()
            down = (u.T @ w64) / sv[:r].sqrt().clamp_min(1e-30)[:, None]  # = Σ^½ V_rᵀ
            del u
            if ws is not None:
                error = float(torch.linalg.norm((w64 - up @ down) @ s) / torch.linalg.norm(ws))
    spectra = {"plain": sv_plain.float().cpu()}
    low = None
    if up is not None:
        bias = linear_bias(module)
        weight = module.weight  # (d_in, d_out) in GPT-2's Conv1D: the shapes come from the choice
        # Built on the meta device and allocated uninitialised: every value is copied in below.
        low = LowRankLinear(
            choice.d_in, choice.d_out, choice.rank, bias=bias is not None, dtype=weight.dtype, device="meta"
        )
        low = low.to_empty(device=weight.device)
        low.up.weight.copy_(up)
        low.down.weight.copy_(down)
        if bias is not None:
            low.up.bias.copy_(bias)
    if sv_white is not None:
        spectra["whitened"] = sv_white.float().cpu()
    if choice.rank is None:
        kept = 1.0
    elif error == error:  # not NaN: the error is in the whitened metric
        kept = 1.0 - error**2
    else:  # plain mode without statistics: only the plain energy is known
        kept = float((sv_plain[: choice.rank] ** 2).sum() / (sv_plain**2).sum())
    row = {
        "name": name,
        "block": block_index(name),
        "kind": name.rsplit(".", 1)[-1],
        "d_out": choice.d_out,
        "d_in": choice.d_in,
        "rank": choice.rank,
        "dense": choice.rank is None,
        "reason": choice.reason,
        "params_kept": choice.params_kept,
        "energy_kept": kept,
        "predicted_error": error,
        "whitening": method,
    }
    return low, row, spectra
