"""Our algorithms against the naive ones, side by side on SmolLM2-135M-Instruct.

1. Calibration: one second-moment accumulation per distinct input (q/k/v and gate/up
   share theirs) vs one per layer.
2. Choice scoring: the prompt runs once and its key/value cache is reused for every
   choice vs scoring each (prompt, choice) sequence in full.
3. Emulator factors: down = Σ^-½ U_rᵀ W vs the textbook Σ^½ V_rᵀ S⁻¹ (time, and how well a
   full rank reproduces W).
Writes results/ours_vs_naive.{json,md}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from emloc_nb import batches, collect_stats, load_model, movie_sentiment
from emloc_nb.factoring import whitening
from emloc_nb.scoring import answer_nll, choice_logprobs
from emloc_nb.structure import block_linears, linear_weight, model_inputs
from emloc_nb.tokens import collator_for, encode_example

HERE = Path(__file__).parent


def naive_calibration(model, data) -> dict[str, torch.Tensor]:
    """Every layer accumulates its own statistics (Σ x xᵀ, Σ|x|, max|x|), shared inputs included."""
    moments, handles = {}, []
    mask = {}
    for name, module in block_linears(model).items():

        def hook(m, args, name=name):
            x = args[0][mask["m"]].float()
            c, a, mx = moments.get(name, (0, 0, 0))
            moments[name] = (
                c + (x.T @ x).double(),
                a + x.abs().sum(0).double(),
                torch.maximum(torch.as_tensor(mx), x.abs().amax(0)),
            )

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in data:
            mask["m"] = b["attention_mask"].bool()
            model(**model_inputs(model, b), use_cache=False, logits_to_keep=1)
    for h in handles:
        h.remove()
    return moments


def naive_choice_scores(model, tok, prompts, choices, batch_size=16) -> torch.Tensor:
    """Score every (prompt, choice) pair as its own full sequence, batched like ours."""
    collate = collator_for(tok)
    scores = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = collate([encode_example(tok, m, c) for m in prompts[i : i + batch_size] for c in choices])
            nll, mask = answer_nll(model, batch)
            scores.append(-(nll * mask).sum(1).view(-1, len(choices)))
    return torch.cat(scores)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model()
    task = movie_sentiment()
    data = batches(tok, task.train, batch_size=8, limit=32)
    results = {}

    ours, t_ours = timed(lambda: collect_stats(model, data, progress=False))
    naive, t_naive = timed(naive_calibration, model, data)
    diff = max(float((ours.layer(n).second_moment - c).abs().max() / c.abs().max()) for n, (c, _, _) in naive.items())
    results["calibration"] = {
        "ours_s": t_ours,
        "naive_s": t_naive,
        "speedup": t_naive / t_ours,
        "accumulations_ours": len(ours.inputs),
        "accumulations_naive": len(naive),
        "max_relative_difference": diff,
    }

    prompts = list(task.test["messages"][:48])
    (scores, _), t_ours = timed(
        lambda: [
            torch.cat(t)
            for t in zip(
                *(choice_logprobs(model, tok, prompts[i : i + 16], task.choices) for i in range(0, len(prompts), 16))
            )
        ]
    )
    naive_scores, t_naive = timed(naive_choice_scores, model, tok, prompts, task.choices)
    same = bool((scores.argmax(1) == naive_scores.argmax(1)).all())
    results["choice_scoring"] = {
        "ours_s": t_ours,
        "naive_s": t_naive,
        "speedup": t_naive / t_ours,
        "same_predictions": same,
        "max_abs_logprob_difference": float((scores - naive_scores).abs().max()),
    }

    layers = {n: m for n, m in block_linears(model).items() if n.startswith(("model.layers.0.", "model.layers.29."))}
    t_ours = t_naive = 0.0
    err_ours = err_naive = 0.0
    for name, module in layers.items():
        w = linear_weight(module).detach().double()
        s, _ = whitening(ours.layer(name).covariance)
        u, sv, vh = torch.linalg.svd(w @ s, full_matrices=False)
        start = time.perf_counter()
        down_ours = (u.T @ w) / sv.sqrt()[:, None]
        t_ours += time.perf_counter() - start
        start = time.perf_counter()
        down_naive = sv.sqrt()[:, None] * vh @ torch.linalg.inv(s)
        t_naive += time.perf_counter() - start
        up = u * sv.sqrt()
        err_ours = max(err_ours, float((up @ down_ours - w).norm() / w.norm()))
        err_naive = max(err_naive, float((up @ down_naive - w).norm() / w.norm()))
    results["emulator_factors"] = {
        "layers": len(layers),
        "ours_s": t_ours,
        "naive_s": t_naive,
        "speedup": t_naive / t_ours,
        "full_rank_error_ours": err_ours,
        "full_rank_error_naive": err_naive,
    }

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "ours_vs_naive.json").write_text(json.dumps(results, indent=2))
    c, s, f = results["calibration"], results["choice_scoring"], results["emulator_factors"]
    md = (
        "\n".join(
            [
                "| what | ours | naive | speed-up | check |",
                "|---|---|---|---|---|",
                f"| calibration, 32 examples ({c['accumulations_ours']} vs {c['accumulations_naive']} accumulations) "
                f"| {c['ours_s']:.1f} s | {c['naive_s']:.1f} s | ×{c['speedup']:.2f} | max rel. diff "
                f"{c['max_relative_difference']:.1e} |",
                f"| choice scoring, 48 prompts × 2 choices | {s['ours_s']:.1f} s | {s['naive_s']:.1f} s | "
                f"×{s['speedup']:.2f} | same predictions: {s['same_predictions']} |",
                f"| emulator down factor, {f['layers']} layers | {f['ours_s']:.2f} s | {f['naive_s']:.2f} s | "
                f"×{f['speedup']:.2f} | full-rank error {f['full_rank_error_ours']:.1e} vs "
                f"{f['full_rank_error_naive']:.1e} |",
            ]
        )
        + "\n"
    )
    (out / "ours_vs_naive.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
