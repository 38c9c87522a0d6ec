"""Evaluation metrics, written with numpy only (scikit-learn is not needed to score a run).

Labels are integer class indices ``0..C-1``; ``scores`` is an ``(n, C)`` array where a higher value
means "more likely this class" (softmax scores, decision values, similarities). Open-set
metrics take an *unknownness* per query: higher means "more likely made by none of the
candidates" (the best distance for resynthesis, minus the best score for a classifier).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return math.nan
    return float(np.mean(y_true == y_pred))


def per_class_accuracy(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Recall of each class; NaN for a class with no query."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        mask = y_true == c
        if mask.any():
            out[c] = float(np.mean(y_pred[mask] == c))
    return out


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> float:
    """Mean of the per-class recalls over the classes that have queries."""
    recalls = per_class_accuracy(y_true, y_pred, n_classes)
    present = recalls[~np.isnan(recalls)]
    return float(present.mean()) if present.size else math.nan


def top_k_accuracy(y_true: Sequence[int], scores: np.ndarray, k: int = 3) -> float:
    """Share of queries whose true class is among the k best-scored (ties broken by class order)."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=float)
    if y_true.size == 0:
        return math.nan
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(order == y_true[:, None], axis=1)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as in the Mann-Whitney U statistic)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=float)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def roc_auc(is_positive: Sequence[bool], score: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half."""
    is_positive = np.asarray(is_positive, dtype=bool)
    score = np.asarray(score, dtype=float)
    n_pos = int(is_positive.sum())
    n_neg = int(is_positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(score)
    u = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def macro_ovr_auc(y_true: Sequence[int], scores: np.ndarray) -> float:
    """Mean one-vs-rest ROC-AUC over the classes that have both positives and negatives."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=float)
    values = [
        roc_auc(y_true == c, scores[:, c])
        for c in range(scores.shape[1])
        if 0 < np.sum(y_true == c) < y_true.size
    ]
    return float(np.mean(values)) if values else math.nan


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(matrix, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return matrix


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), NaNs ignored."""
    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]
    if array.size == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


# ----------------------------------------------------------------------------- open set
def open_set_auroc(unknownness: Sequence[float], is_unknown: Sequence[bool]) -> float:
    """AUROC of telling unknown-source queries from known ones by their unknownness."""
    return roc_auc(is_unknown, unknownness)


def known_threshold(known_unknownness: Sequence[float], percentile: float = 95.0) -> float:
    """The threshold above which a query is called unknown, chosen on known queries only."""
    values = np.asarray(known_unknownness, dtype=float)
    if values.size == 0:
        return math.nan
    return float(np.percentile(values, percentile))


def open_set_accuracy(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    is_unknown: Sequence[bool],
    unknownness: Sequence[float],
    threshold: float,
) -> dict[str, float]:
    """Accuracy when 'unknown' is an answer: above the threshold a query is called unknown.

    A known query is right when it stays under the threshold and gets its true class; an unknown
    one is right when it goes over. Also returns the two parts separately.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    is_unknown = np.asarray(is_unknown, dtype=bool)
    flagged = np.asarray(unknownness, dtype=float) > threshold
    right = np.where(is_unknown, flagged, ~flagged & (y_true == y_pred))
    known, unknown = ~is_unknown, is_unknown
    return {
        "accuracy": float(right.mean()) if right.size else math.nan,
        "known_accuracy": float(right[known].mean()) if known.any() else math.nan,
        "unknown_recall": float(right[unknown].mean()) if unknown.any() else math.nan,
    }


def softmax_rows(values: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``values / temperature``."""
    logits = np.asarray(values, dtype=float) / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)
