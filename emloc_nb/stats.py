"""Statistics for honest comparisons: bias-free scores of a classifier, and paired tests between two settings.

Accuracy alone hides a constant push toward one class; the AUC of the choice scores and
the balanced accuracy do not. Two settings scored on the same examples are compared
with paired tests: McNemar's exact test on the examples where exactly one is right, and
a paired bootstrap of the accuracy difference. torch is imported by the functions that use it, so that
an ablation's table can be summed up without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def auc(scores: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Area under the ROC curve of the choice scores: one class against the rest, averaged over classes.

    A class's score is its margin over the best other choice. For two classes this is the
    AUC of score[0] − score[1]: how well the scores rank the examples, whatever constant
    offset they carry. Classes absent from `gold` are skipped; NaN when none can be scored.
    """
    import torch

    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(gold)
    values = []
    for c in range(s.shape[1]):
        others = torch.cat([s[:, :c], s[:, c + 1 :]], dim=1)
        margin = s[:, c] - others.max(1).values
        pos, neg = margin[y == c], margin[y != c]
        if len(pos) and len(neg):
            values.append(
                float(
                    (pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean()
                )
            )
        if s.shape[1] == 2:
            break  # the other class's AUC is the same
    return sum(values) / len(values) if values else float("nan")


def balanced_accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Mean over the classes present in `gold` of the share of that class predicted right."""
    recall = []
    for c in sorted(set(gold)):
        members = [p for p, g in zip(pred, gold) if g == c]
        recall.append(sum(p == c for p in members) / len(members))
    return sum(recall) / len(recall)


def mcnemar(a_right: Sequence[bool], b_right: Sequence[bool]) -> dict:
    """McNemar's exact test: where exactly one setting is right, is one of them right more often than chance?"""
    a_only = sum(bool(a) and not b for a, b in zip(a_right, b_right))
    b_only = sum(bool(b) and not a for a, b in zip(a_right, b_right))
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n if n else 0.5
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}


def paired_bootstrap(a_right: Sequence[bool], b_right: Sequence[bool], *, samples: int = 10_000, seed: int = 0) -> dict:
    """Accuracy difference a − b, its 95% interval and a two-sided p, resampling the examples in pairs."""
    import torch

    diff = torch.as_tensor(a_right, dtype=torch.float64) - torch.as_tensor(b_right, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = diff[torch.randint(len(diff), (samples, len(diff)), generator=g)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    p = 2 * min(float((means <= 0).double().mean()), float((means >= 0).double().mean()))
    return {"diff": float(diff.mean()), "low": low, "high": high, "p": min(1.0, p)}
