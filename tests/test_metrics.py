"""Evaluation metrics against values worked out by hand on small fixed examples.

The metrics come from scikit-learn; the brute-force references they are checked against live here,
in the tests, and nowhere in the package.
"""

from __future__ import annotations

import math
import subprocess
import sys
from itertools import product

import numpy as np
import pytest

from resynth_index.errors import RsxError
from resynth_index.evaluation import metrics

pytest.importorskip("sklearn")

Y_TRUE = [0, 0, 0, 1, 2, 2]
Y_PRED = [0, 0, 1, 1, 2, 0]


def test_accuracy_balanced_accuracy_and_per_class():
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    # recalls: class 0 2/3, class 1 1/1, class 2 1/2
    assert metrics.per_class_accuracy(Y_TRUE, Y_PRED, 4)[:3] == pytest.approx([2 / 3, 1, 1 / 2])
    assert math.isnan(metrics.per_class_accuracy(Y_TRUE, Y_PRED, 4)[3])  # no query of class 3
    assert metrics.balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


def test_confusion_matrix_rows_are_true_classes():
    expected = np.array([[2, 1, 0], [0, 1, 0], [1, 0, 1]])
    assert (metrics.confusion_matrix(Y_TRUE, Y_PRED, 3) == expected).all()


def test_top3_accuracy_with_four_classes():
    scores = np.array(
        [
            [0.1, 0.2, 0.3, 0.4],  # true 0, ranked last: miss
            [0.4, 0.3, 0.2, 0.1],  # true 3, ranked last: miss
            [0.4, 0.3, 0.2, 0.1],  # true 2, third: hit
            [0.1, 0.9, 0.0, 0.5],  # true 3, second: hit
        ]
    )
    y = [0, 3, 2, 3]
    assert metrics.top_k_accuracy(y, scores, 3) == pytest.approx(0.5)
    assert metrics.top_k_accuracy(y, scores, 1) == pytest.approx(0.0)


def test_roc_auc_counts_pairs_and_half_ties():
    assert metrics.roc_auc([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1]) == pytest.approx(3 / 4)
    assert metrics.roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx(3.5 / 4)
    assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))


def test_macro_one_vs_rest_auc():
    y = [0, 1, 2, 0]
    scores = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.5, 0.15], [0.4, 0.4, 0.2]])
    # class 0: 4/4 pairs right; class 1: 3/3; class 2: 0.15 beats 0.1, 0.1 but not 0.2 -> 2/3
    assert metrics.macro_ovr_auc(y, scores) == pytest.approx((1 + 1 + 2 / 3) / 3)


def test_macro_auc_matches_scikit_learn_on_random_scores():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    y = np.tile(np.arange(4), 10)
    scores = rng.random((40, 4))
    scores /= scores.sum(axis=1, keepdims=True)
    expected = sklearn_metrics.roc_auc_score(y, scores, multi_class="ovr", average="macro")
    assert metrics.macro_ovr_auc(y, scores) == pytest.approx(expected)
    assert metrics.balanced_accuracy(y, scores.argmax(1)) == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(y, scores.argmax(1))
    )


def test_mean_and_sample_std():
    mean, std = metrics.mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7)
    assert std == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    mean, std = metrics.mean_std([0.3])
    assert mean == pytest.approx(0.3) and math.isnan(std)  # one repeat: no spread
    assert all(math.isnan(v) for v in metrics.mean_std([]))
    assert metrics.mean_std([0.4, math.nan, 0.6])[0] == pytest.approx(0.5)


def test_open_set_auroc_threshold_and_accuracy():
    unknownness = [0.1, 0.2, 0.3, 0.9, 0.25]
    is_unknown = [False, False, False, True, True]
    # 0.9 beats all three known; 0.25 beats 0.1 and 0.2 only -> 5/6
    assert metrics.open_set_auroc(unknownness, is_unknown) == pytest.approx(5 / 6)
    threshold = metrics.known_threshold([0.1, 0.2, 0.3], 95)
    assert threshold == pytest.approx(0.29)  # linear interpolation at rank 1.9
    result = metrics.open_set_accuracy(
        [0, 1, 0, -1, -1], [0, 1, 1, 0, 1], is_unknown, unknownness, threshold
    )
    # known: right, right, flagged (wrong); unknown: flagged (right), missed (wrong)
    assert result == pytest.approx(
        {"accuracy": 3 / 5, "known_accuracy": 2 / 3, "unknown_recall": 1 / 2}
    )


def test_softmax_rows_sums_to_one_and_orders():
    probs = metrics.softmax_rows(np.array([[1.0, 2.0, 3.0]]), 0.5)
    assert probs.sum() == pytest.approx(1.0)
    assert list(np.argsort(probs[0])) == [0, 1, 2]


# ----------------------------------------------------------------------------- brute force
def _brute_confusion(y_true, y_pred, n_classes):
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred, strict=True):
        matrix[t][p] += 1
    return matrix


def _brute_recalls(y_true, y_pred, n_classes):
    """Per class: right / queries of that class, None for a class without queries."""
    out = []
    for c in range(n_classes):
        mine = [p for t, p in zip(y_true, y_pred, strict=True) if t == c]
        out.append(sum(p == c for p in mine) / len(mine) if mine else None)
    return out


def _brute_top_k(y_true, scores, k):
    """A query is a hit when fewer than k classes rank above its true class; a class ranks
    above it with a higher score, or the same score and a lower index."""
    hits = 0
    for t, row in zip(y_true, scores, strict=True):
        above = sum(1 for c, v in enumerate(row) if v > row[t] or (v == row[t] and c < t))
        hits += above < k
    return hits / len(y_true)


def _brute_auc(is_positive, score):
    """Every (positive, negative) pair: 1 when the positive scores higher, 1/2 on a tie."""
    pos = [s for p, s in zip(is_positive, score, strict=True) if p]
    neg = [s for p, s in zip(is_positive, score, strict=True) if not p]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg)]
    return sum(pairs) / len(pairs)


# Fixed data: 5 classes, class 4 never a true class (but predicted), scores that are not
# probabilities (negative margins), rounded to one decimal so that ties occur.
FIXED_TRUE = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 0, 3, 3, 1, 2, 0, 2, 1, 0])
FIXED_SCORES = np.round(np.random.default_rng(11).normal(size=(20, 5)), 1)


def test_fixed_data_has_the_edge_cases_it_claims():
    assert 4 not in FIXED_TRUE and 4 in FIXED_SCORES.argmax(axis=1)
    assert FIXED_SCORES.min() < 0
    assert any(len(set(row)) < len(row) for row in FIXED_SCORES.tolist())  # a tie in a row


def test_sklearn_backed_metrics_agree_with_brute_force():
    y, scores = FIXED_TRUE, FIXED_SCORES
    pred = scores.argmax(axis=1)
    right = sum(int(t == p) for t, p in zip(y, pred, strict=True))
    assert metrics.accuracy(y, pred) == pytest.approx(right / len(y))
    assert metrics.confusion_matrix(y, pred, 5).tolist() == _brute_confusion(y, pred, 5)
    recalls = _brute_recalls(y, pred, 5)
    got = metrics.per_class_accuracy(y, pred, 5)
    assert got[:4] == pytest.approx(recalls[:4]) and math.isnan(got[4])
    present = [r for r in recalls if r is not None]
    assert metrics.balanced_accuracy(y, pred) == pytest.approx(sum(present) / len(present))
    for k in (1, 2, 3, 4):
        assert metrics.top_k_accuracy(y, scores, k) == pytest.approx(_brute_top_k(y, scores, k))
    for c in range(4):
        assert metrics.roc_auc(y == c, scores[:, c]) == pytest.approx(
            _brute_auc(y == c, scores[:, c])
        )
    per_class = [_brute_auc(y == c, scores[:, c]) for c in range(4)]  # class 4 has no positive
    assert metrics.macro_ovr_auc(y, scores) == pytest.approx(sum(per_class) / 4)


def test_top_1_equals_accuracy_even_when_scores_tie():
    scores = np.array([[0.5, 0.5, 0.5, 0.5], [0.2, 0.7, 0.7, 0.1], [0.0, 0.0, 0.0, 0.0]])
    y = [0, 1, 3]
    pred = scores.argmax(axis=1)  # ties go to the lowest index: 0, 1, 0
    assert metrics.top_k_accuracy(y, scores, 1) == pytest.approx(metrics.accuracy(y, pred))
    assert metrics.top_k_accuracy(y, scores, 3) == pytest.approx(2 / 3)  # class 3 ranks 4th


def test_top_k_with_two_classes_and_with_k_covering_every_class():
    scores = np.array([[2.0, -1.0], [-3.0, -2.0], [0.4, 0.6]])  # margins, not probabilities
    assert metrics.top_k_accuracy([0, 0, 0], scores, 1) == pytest.approx(1 / 3)
    assert metrics.top_k_accuracy([0, 1, 1], scores, 1) == pytest.approx(1.0)
    assert metrics.top_k_accuracy([0, 0, 0], scores, 3) == 1.0


def test_macro_auc_skips_classes_without_positives_or_negatives():
    scores = np.array([[3.0, -1.0, 0.0], [1.0, 2.0, 0.0], [-2.0, 0.5, 9.0]])
    assert metrics.macro_ovr_auc([0, 1, 1], scores) == pytest.approx(1.0)  # class 2: no query
    assert math.isnan(metrics.macro_ovr_auc([0, 0, 0], scores))  # no class qualifies


def test_empty_inputs_give_nan_and_an_empty_confusion_matrix():
    empty = np.zeros((0, 3))
    assert math.isnan(metrics.accuracy([], []))
    assert math.isnan(metrics.balanced_accuracy([], []))
    assert math.isnan(metrics.top_k_accuracy([], empty, 2))
    assert math.isnan(metrics.macro_ovr_auc([], empty))
    assert metrics.confusion_matrix([], [], 3).tolist() == [[0] * 3] * 3


def test_importing_the_metrics_does_not_import_scikit_learn():
    code = (
        "import sys, resynth_index.evaluation.metrics as m; "
        "assert 'sklearn' not in sys.modules, 'sklearn imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_scikit_learn_a_metric_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(RsxError, match=r"pip install 'resynth-index\[eval\]'"):
        metrics.accuracy([0], [0])
