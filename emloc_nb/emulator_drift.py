"""Drift: how far an emulator strays from its original, as a DriftReport.

Per layer, the relative output error on held-out activations (and the one the
spectra predicted); per block, the hidden-state cosine; end to end, next-token KL
and perplexity. `output_energy` and `relative_error` are the quadratic forms the
correction's report uses as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from .artifacts import check_fingerprint
from .calibration import CalibrationStats, collect_stats
from .fingerprints import fingerprint
from .measure import phase
from .progress import progress as progress_bar
from .reports import LayerReport
from .structure import linear_weight, model_inputs, nothing_to_predict, on_device


@dataclass
class DriftReport(LayerReport):
    """How far the emulator drifts from its original, per layer, per block and end to end.

    `rows` (and `layer(name)`) are the per-layer errors; `blocks`, `summary` and
    `tokens` the rest.
    """

    kind = "drift"

    rows: list[dict]  # name, block, kind, rank, predicted_error, measured_error
    blocks: list[dict]  # block, cosine (mean hidden-state cosine at the block's output)
    summary: dict  # kl, ppl_original, ppl_emulator, ppl_ratio, tokens, mean_measured_error
    tokens: list[dict] = field(default_factory=list)  # per example: tokens and per-token KL

    def _metadata(self) -> dict:
        return {"layers": self.rows, "blocks": self.blocks, "summary": self.summary, "tokens": self.tokens}

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict) -> DriftReport:
        return cls(meta["layers"], meta["blocks"], meta["summary"], meta["tokens"])


def output_energy(m: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """tr(M C Mᵀ): the summed ‖M x‖² over the tokens whose second moment is C, in float64."""
    m = m.double()
    return torch.einsum("oi,ij,oj->", m, covariance.double(), m)


def relative_error(delta: torch.Tensor, weight: torch.Tensor, covariance: torch.Tensor) -> float:
    """‖Δ x‖ / ‖W x‖ summed over the tokens whose second moment is `covariance`: √(tr ΔCΔᵀ / tr WCWᵀ)."""
    num, den = float(output_energy(delta, covariance)), float(output_energy(weight, covariance))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")


@torch.no_grad()
@phase("drift")
def drift(
    original: nn.Module,
    emulator,
    batches: list[dict],
    *,
    heldout: CalibrationStats | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    token_examples: int = 4,
    progress: bool = True,
) -> DriftReport:
    """Compare `emulator` (an Emulator) with `original` on held-out `batches`.

    Per-layer errors use the second moments of the original's inputs on these
    batches (`heldout`, collected here if not given), so they measure each layer
    alone; block cosines and KL measure the drift as it accumulates.
    """
    original_fp = fingerprint(original)
    check_fingerprint(emulator.original_fingerprint, original_fp, artifact="The emulator", model="the original model")
    if heldout is None:
        heldout = collect_stats(original, batches, layers=emulator.spectra.names, progress=progress)
    check_fingerprint(
        heldout.model_fingerprint, original_fp, artifact="The held-out statistics", model="the original model"
    )
    originals = dict(original.named_modules())
    emulated = dict(emulator.model.named_modules())
    layers = []
    for row in emulator.spectra.rows:
        w = linear_weight(originals[row["name"]]).detach()
        delta = w - linear_weight(emulated[row["name"]]).detach()
        layers.append(
            {
                "name": row["name"],
                "block": row["block"],
                "kind": row["kind"],
                "rank": row["rank"],
                "predicted_error": row["predicted_error"],
                "measured_error": relative_error(delta, w, heldout.layer(row["name"]).covariance),
            }
        )

    cos_sum: torch.Tensor | None = None
    kl_sum = nll_o = nll_e = 0.0
    n_tok = n_pred = 0
    examples = []
    for batch in progress_bar(batches, desc="drift", enabled=progress):
        batch = on_device(original, batch)
        inputs = model_inputs(original, batch)
        out_o = original(**inputs, output_hidden_states=True, use_cache=False)
        out_e = emulator.model(**inputs, output_hidden_states=True, use_cache=False)
        mask = batch["attention_mask"].bool()
        cos = torch.stack(
            [
                F.cosine_similarity(a.float(), b.float(), dim=-1)[mask].sum()
                for a, b in zip(out_o.hidden_states[1:], out_e.hidden_states[1:])
            ]
        )
        cos_sum = cos if cos_sum is None else cos_sum + cos
        n_tok += int(mask.sum())
        pred = mask[:, :-1] & mask[:, 1:]  # positions whose next token is real
        n_pred += int(pred.sum())
        # One example at a time: a batch's vocabulary-wide log-softmaxes would each be as large as its logits.
        for i in range(len(batch["input_ids"])):
            lo, le = out_o.logits[i].float().log_softmax(-1), out_e.logits[i].float().log_softmax(-1)
            kl = (lo.exp() * (lo - le)).sum(-1)  # KL(original ‖ emulator) per position
            kl_sum += float(kl[mask[i]].sum())
            target = batch["input_ids"][i, 1:, None]
            nll_o -= float(lo[:-1].gather(1, target).squeeze(1)[pred[i]].sum())
            nll_e -= float(le[:-1].gather(1, target).squeeze(1)[pred[i]].sum())
            if len(examples) < token_examples and tokenizer is not None:
                ids = batch["input_ids"][i][mask[i]]
                examples.append({"tokens": tokenizer.convert_ids_to_tokens(ids.tolist()), "kl": kl[mask[i]].tolist()})
            del lo, le, kl
    if n_pred == 0:
        raise nothing_to_predict("drift")
    blocks = [{"block": b, "cosine": float(c) / n_tok} for b, c in enumerate(cos_sum.tolist())]
    ppl_o, ppl_e = math.exp(nll_o / n_pred), math.exp(nll_e / n_pred)
    summary = {
        "kl": kl_sum / n_tok,
        "ppl_original": ppl_o,
        "ppl_emulator": ppl_e,
        "ppl_ratio": ppl_e / ppl_o,
        "tokens": n_tok,
        "mean_measured_error": sum(r["measured_error"] for r in layers) / max(len(layers), 1),
    }
    return DriftReport(layers, blocks, summary, examples)
