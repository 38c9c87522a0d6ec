"""Few-shot baselines on the lab's embedder features, and the seeded draw of training shots.

The baselines the paper compares against, trained on N references per generator:

- ``knn``: cosine k-nearest neighbours (numpy), each neighbour voting with its similarity;
- ``clip-svm``: a linear SVM; ``clip-logreg``: logistic regression; ``clip-mlp``: a one-hidden-layer
  perceptron (scikit-learn, imported only when one of them runs).

Every method returns an ``(n_test, n_classes)`` score array (higher = more likely that class), so
the same metrics apply to all. Features are L2-normalised embeddings; the scikit-learn models
standardise them first.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from resynth_index.errors import RsxError

FEWSHOT_METHODS = ("knn", "clip-svm", "clip-logreg", "clip-mlp")
SKLEARN_METHODS = ("clip-svm", "clip-logreg", "clip-mlp")
INSTALL_HINT = "pip install 'resynth-index[eval]'"
KNN_K = 5


def require_sklearn() -> None:
    """Fail with one line saying how to install scikit-learn when it is missing.

    ``rsx eval`` needs it for every run: the metrics come from ``sklearn.metrics``.
    """
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise RsxError(
            f"rsx eval needs scikit-learn (metrics, few-shot baselines): {INSTALL_HINT}"
        ) from None


# ----------------------------------------------------------------------------- draws
def draw_shots(
    labels: ArrayLike,
    shots: int,
    rng: np.random.Generator,
    classes: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``shots`` training items per class; every other item is a test item.

    Returns (train indices, test indices), both sorted; they never overlap. ``classes`` limits the
    draw to those classes (items of other classes all go to test). A class with ``shots`` items or
    fewer cannot keep a test item and is refused.
    """
    label_array = np.asarray(labels)
    drawn = np.unique(label_array) if classes is None else np.asarray(classes)
    train: list[int] = []
    for c in drawn:
        members = np.flatnonzero(label_array == c)
        if len(members) <= shots:
            raise ValueError(f"class {c} has {len(members)} items: {shots} shots leave no test")
        train.extend(rng.choice(members, size=shots, replace=False).tolist())
    train_idx = np.array(sorted(train), dtype=int)
    test_idx = np.setdiff1d(np.arange(len(label_array)), train_idx)
    return train_idx, test_idx


# ----------------------------------------------------------------------------- similarities
def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def class_means(x_train: np.ndarray, y_train: np.ndarray, n_classes: int) -> np.ndarray:
    """L2-normalised mean feature of each class (zeros for a class without training items)."""
    means = np.zeros((n_classes, x_train.shape[1]))
    for c in range(n_classes):
        members = x_train[y_train == c]
        if len(members):
            means[c] = members.mean(axis=0)
    return _unit(means)


def class_mean_similarity(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int
) -> np.ndarray:
    """Cosine similarity of each test item to each class's mean training feature."""
    return _unit(x_test) @ class_means(x_train, y_train, n_classes).T


def leave_one_out_class_mean_similarity(
    x_train: np.ndarray, y_train: np.ndarray, n_classes: int
) -> np.ndarray:
    """For each training item, its class-mean similarities with itself left out of its class.

    A class left empty by that (one shot) gives NaN in that column.
    """
    x_train = np.asarray(x_train, dtype=float)
    sums = np.zeros((n_classes, x_train.shape[1]))
    counts = np.zeros(n_classes)
    for c in range(n_classes):
        sums[c] = x_train[y_train == c].sum(axis=0)
        counts[c] = np.sum(y_train == c)
    units = _unit(x_train)
    out = np.empty((len(x_train), n_classes))
    for i, (x, y) in enumerate(zip(x_train, y_train, strict=True)):
        s, n = sums.copy(), counts.copy()
        s[y] -= x
        n[y] -= 1
        means = _unit(np.where(n[:, None] > 0, s, 0.0))
        row = means @ units[i]
        row[n == 0] = np.nan
        out[i] = row
    return out


def knn_scores(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int, k: int = KNN_K
) -> np.ndarray:
    """Similarity-weighted votes of the k most similar training items (cosine).

    A small share of each class's best similarity is added, so classes without a vote are still
    ranked (for top-3 and ROC-AUC) and ties go to the closer class.
    """
    sims = _unit(x_test) @ _unit(x_train).T
    k = max(1, min(k, x_train.shape[0]))
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.zeros((len(x_test), n_classes))
    for row, idx in enumerate(nearest):
        np.add.at(scores[row], y_train[idx], 1.0 + sims[row, idx])
    best = np.full((len(x_test), n_classes), -1.0)
    for c in range(n_classes):
        members = y_train == c
        if members.any():
            best[:, c] = sims[:, members].max(axis=1)
    return scores + 1e-3 * best


# ----------------------------------------------------------------------------- classifiers
def _sklearn_model(method: str, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if method == "clip-svm":
        model = LinearSVC(C=1.0, max_iter=10_000, random_state=seed)
    elif method == "clip-logreg":
        model = LogisticRegression(C=1.0, max_iter=5_000)
    elif method == "clip-mlp":
        model = MLPClassifier(
            hidden_layer_sizes=(256,), alpha=1e-3, max_iter=500, random_state=seed
        )
    else:
        raise ValueError(f"unknown few-shot method {method!r}")
    return make_pipeline(StandardScaler(), model)


def fit_predict_scores(
    method: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_tests: Sequence[np.ndarray],
    n_classes: int,
    seed: int = 0,
) -> list[np.ndarray]:
    """Train ``method`` once on (x_train, y_train); score every array in ``x_tests``.

    Returns one ``(len(x), n_classes)`` array per test array; a class absent from training gets
    the lowest score in every row.
    """
    y_train = np.asarray(y_train, dtype=int)
    if method == "knn":
        return [knn_scores(x_train, y_train, x, n_classes) for x in x_tests]
    if method not in SKLEARN_METHODS:
        raise ValueError(f"unknown few-shot method {method!r}")
    require_sklearn()
    present = np.unique(y_train)
    if len(present) < 2:
        raise RsxError("a few-shot classifier needs references of at least two generators")
    model = _sklearn_model(method, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on tiny training sets
        model.fit(x_train, y_train)
    outputs = []
    for x in x_tests:
        if method == "clip-svm":
            raw = model.decision_function(x)
            if raw.ndim == 1:  # two classes: one signed margin
                raw = np.stack([-raw, raw], axis=1)
        else:
            raw = model.predict_proba(x)
        scores = np.full((len(x), n_classes), np.min(raw) - 1.0 if raw.size else -1.0)
        scores[:, present] = raw
        outputs.append(scores)
    return outputs
