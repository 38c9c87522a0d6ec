"""Evaluation metrics: scikit-learn's where it has them, numpy for the open-set parts.

Labels are integer class indices ``0..C-1``; ``scores`` is an ``(n, C)`` array where a higher value
means "more likely this class" (softmax scores, decision values, similarities). Open-set
metrics take an *unknownness* per query: higher means "more likely made by none of the
candidates" (the best distance for resynthesis, minus the best score for a classifier).

scikit-learn (the ``[eval]`` extra) is imported inside the functions that use it, so importing
this module stays cheap. What is written here by hand, and why:

- empty inputs give NaN (scikit-learn raises on them);
- ROC-AUC with only positives or only negatives is NaN (scikit-learn warns or raises, by version);
- the macro one-vs-rest ROC-AUC averages scikit-learn's binary AUC over the classes that have
  both positives and negatives among the queries. ``roc_auc_score(multi_class="ovr")`` cannot
  be used: it refuses scores that are not probabilities (SVM margins, hybrid z-scores) and a
  class absent from ``y_true``, which a test split with held-out generators can produce;
- top-k breaks ties between equal scores towards the lower class index, as ``argmax`` does, so
  top-1 always equals accuracy; with two classes it does not go through scikit-learn, whose
  binary case thresholds one score instead of ranking the classes;
- the sample standard deviation over repeats, the open-set threshold and the open-set accuracy
  (scikit-learn has no "unknown" answer) and the row-wise softmax.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from numpy.typing import ArrayLike

from resynth_index.errors import RsxError
from resynth_index.evaluation.fewshot import INSTALL_HINT


def _sklearn_metrics():
    """``sklearn.metrics``, or a one-line error saying how to install it."""
    try:
        from sklearn import metrics as sklearn_metrics
    except ImportError:
        raise RsxError(f"the evaluation metrics need scikit-learn: {INSTALL_HINT}") from None
    return sklearn_metrics


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Share of queries predicted right; NaN without queries."""
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    if truth.size == 0:
        return math.nan
    return float(_sklearn_metrics().accuracy_score(truth, pred))


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class (``n_classes`` x ``n_classes``)."""
    truth, pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if truth.size == 0:
        return np.zeros((n_classes, n_classes), dtype=int)
    matrix = _sklearn_metrics().confusion_matrix(truth, pred, labels=np.arange(n_classes))
    return matrix.astype(int)


def per_class_accuracy(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> np.ndarray:
    """Recall of each class (diagonal over row sums of the confusion matrix); NaN for a class
    with no query."""
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    totals = matrix.sum(axis=1)
    out = np.full(n_classes, np.nan)
    present = totals > 0
    out[present] = np.diag(matrix)[present] / totals[present]
    return out


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean of the per-class recalls over the classes that have queries; NaN without queries.

    A predicted class that no query has does not count as a class (scikit-learn warns about it;
    the warning is silenced because the protocol expects it).
    """
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    if truth.size == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(_sklearn_metrics().balanced_accuracy_score(truth, pred))


def top_k_accuracy(y_true: ArrayLike, scores: np.ndarray, k: int = 3) -> float:
    """Share of queries whose true class is among the k best-scored (ties: lower class first)."""
    truth = np.asarray(y_true, dtype=int)
    scores = np.asarray(scores, dtype=float)
    if truth.size == 0:
        return math.nan
    n_classes = scores.shape[1]
    if k >= n_classes:
        return 1.0  # every class is in the top k
    if n_classes == 2:  # k == 1: scikit-learn's binary case would threshold one column
        return accuracy(truth, scores.argmax(axis=1))
    # scikit-learn ranks tied scores with the later column first; reversing the columns (and
    # the labels with them) makes it the earlier class, as argmax does.
    return float(
        _sklearn_metrics().top_k_accuracy_score(
            n_classes - 1 - truth, scores[:, ::-1], k=k, labels=np.arange(n_classes)
        )
    )


def roc_auc(is_positive: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half.

    NaN when there are no positives or no negatives.
    """
    positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(score, dtype=float)
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == positive.size:
        return math.nan
    return float(_sklearn_metrics().roc_auc_score(positive, scores))


def macro_ovr_auc(y_true: ArrayLike, scores: np.ndarray) -> float:
    """Mean one-vs-rest ROC-AUC over the classes that have both positives and negatives.

    Each class's AUC ranks all queries by that class's score. Scores need not be probabilities.
    NaN when no class qualifies.
    """
    truth = np.asarray(y_true, dtype=int)
    scores = np.asarray(scores, dtype=float)
    onehot = truth[:, None] == np.arange(scores.shape[1])[None, :]
    positives = onehot.sum(axis=0)
    valid = np.flatnonzero((positives > 0) & (positives < truth.size))
    if valid.size == 0:
        return math.nan
    if valid.size == 1:
        return roc_auc(onehot[:, valid[0]], scores[:, valid[0]])
    # a multilabel indicator target: scikit-learn takes each column's binary AUC and averages
    return float(
        _sklearn_metrics().roc_auc_score(
            onehot[:, valid].astype(int), scores[:, valid], average="macro"
        )
    )


def mean_std(values: ArrayLike) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1), NaNs ignored.

    The standard deviation of a single value is NaN: one repeat has no spread to report.
    """
    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]
    if array.size == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std


# ----------------------------------------------------------------------------- open set
def open_set_auroc(unknownness: ArrayLike, is_unknown: ArrayLike) -> float:
    """AUROC of telling unknown-source queries from known ones by their unknownness."""
    return roc_auc(is_unknown, unknownness)


def known_threshold(known_unknownness: ArrayLike, percentile: float = 95.0) -> float:
    """The threshold above which a query is called unknown, chosen on known queries only."""
    values = np.asarray(known_unknownness, dtype=float)
    if values.size == 0:
        return math.nan
    return float(np.percentile(values, percentile))


def open_set_accuracy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    is_unknown: ArrayLike,
    unknownness: ArrayLike,
    threshold: float,
) -> dict[str, float]:
    """Accuracy when 'unknown' is an answer: above the threshold a query is called unknown.

    A known query is right when it stays under the threshold and gets its true class; an unknown
    one is right when it goes over. Also returns the two parts separately.
    """
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    unknown = np.asarray(is_unknown, dtype=bool)
    flagged = np.asarray(unknownness, dtype=float) > threshold
    right = np.where(unknown, flagged, ~flagged & (truth == pred))
    known = ~unknown
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
