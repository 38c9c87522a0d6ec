"""Evaluation metrics against values worked out by hand on small fixed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from resynth_index.evaluation import metrics

Y_TRUE = [0, 0, 0, 1, 2, 2]
Y_PRED = [0, 0, 1, 1, 2, 0]


def test_accuracy_balanced_accuracy_and_per_class():
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    # recalls: class 0 2/3, class 1 1/1, class 2 1/2
    assert metrics.per_class_accuracy(Y_TRUE, Y_PRED, 4)[:3] == pytest.approx([2 / 3, 1, 1 / 2])
    assert math.isnan(metrics.per_class_accuracy(Y_TRUE, Y_PRED, 4)[3])  # no query of class 3
    assert metrics.balanced_accuracy(Y_TRUE, Y_PRED, 4) == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


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
    assert metrics.balanced_accuracy(y, scores.argmax(1), 4) == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(y, scores.argmax(1))
    )


def test_mean_and_sample_std():
    mean, std = metrics.mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7)
    assert std == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    assert metrics.mean_std([0.3]) == (pytest.approx(0.3), 0.0)
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
