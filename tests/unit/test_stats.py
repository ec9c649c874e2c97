import itertools
import math
import random

import pytest

from emloc_nb.stats import auc, balanced_accuracy, mcnemar, mean_std, paired_bootstrap


def test_auc_counts_the_pairs_ranked_right_and_ignores_a_constant_offset():
    scores = [[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]
    gold = [0, 0, 1, 1, 0]
    margin = [s[0] - s[1] for s in scores]
    pairs = [(p, n) for p, n in itertools.product(range(5), range(5)) if gold[p] == 0 and gold[n] == 1]
    brute = sum((margin[p] > margin[n]) + 0.5 * (margin[p] == margin[n]) for p, n in pairs) / len(pairs)
    assert auc(scores, gold) == pytest.approx(brute)
    shifted = [[a + 5.0, b] for a, b in scores]  # every answer pushed toward the first choice
    assert auc(shifted, gold) == pytest.approx(brute)
    assert auc([[1.0, 0.0]] * 3, [0, 0, 0]) != auc([[1.0, 0.0]] * 3, [0, 0, 0])  # NaN: nothing to rank


def test_auc_of_three_classes_is_the_mean_of_one_against_the_rest():
    perfect = [[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]] * 2
    assert auc(perfect, [0, 1, 2] * 2) == 1.0
    assert auc(perfect, [1, 2, 0] * 2) < 0.5  # every class scored highest on another class's examples


def test_balanced_accuracy_weighs_classes_equally():
    assert balanced_accuracy([0, 0, 0, 0], [0, 0, 0, 1]) == 0.5  # always "0": 3/4 accurate, but half balanced
    assert balanced_accuracy([0, 1, 1, 1], [0, 0, 1, 1]) == 0.75


def test_mcnemar_exact_p():
    a = [True] * 10 + [False] * 2 + [True] * 5
    b = [False] * 10 + [True] * 2 + [True] * 5
    result = mcnemar(a, b)
    assert (result["a_only"], result["b_only"]) == (10, 2)
    assert result["p"] == pytest.approx(2 * sum(math.comb(12, i) for i in range(3)) / 2**12)
    assert mcnemar([True, False], [True, False])["p"] == 1.0


def test_paired_bootstrap_interval_covers_the_difference():
    rng = random.Random(0)
    a = [rng.random() < 0.8 for _ in range(400)]
    b = [x if rng.random() < 0.8 else not x for x in a]
    result = paired_bootstrap(a, b, samples=2000)
    diff = (sum(a) - sum(b)) / 400
    assert result["diff"] == pytest.approx(diff)
    assert result["low"] <= diff <= result["high"]
    same = paired_bootstrap(a, a, samples=500)
    assert same["diff"] == 0 and same["p"] == 1.0
    clearly_better = paired_bootstrap([True] * 100, [False] * 50 + [True] * 50, samples=500)
    assert clearly_better["p"] < 0.01 and clearly_better["low"] > 0


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)
