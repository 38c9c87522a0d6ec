"""Few-shot draws and baselines on small synthetic feature sets."""

from __future__ import annotations

import numpy as np
import pytest

from resynth_index.evaluation import fewshot


def _blobs(n_classes=4, per_class=12, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_draws_are_reproducible_for_a_seed_and_differ_for_another():
    labels = np.repeat(np.arange(10), 20)
    first = fewshot.draw_shots(labels, 5, np.random.default_rng(7))
    again = fewshot.draw_shots(labels, 5, np.random.default_rng(7))
    other = fewshot.draw_shots(labels, 5, np.random.default_rng(8))
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert not (first[0] == other[0]).all()


def test_draw_takes_n_per_class_and_tests_on_the_rest():
    labels = np.repeat(np.arange(3), [6, 7, 8])
    train, test = fewshot.draw_shots(labels, 2, np.random.default_rng(0))
    assert np.bincount(labels[train]).tolist() == [2, 2, 2]
    assert not set(train) & set(test)
    assert sorted([*train, *test]) == list(range(len(labels)))


def test_draw_limited_to_some_classes_sends_the_others_to_test():
    labels = np.repeat(np.arange(3), 5)
    train, test = fewshot.draw_shots(labels, 1, np.random.default_rng(0), classes=[0, 2])
    assert set(labels[train]) == {0, 2}
    assert set(np.flatnonzero(labels == 1)) <= set(test)


def test_draw_refuses_a_class_that_would_keep_no_test_item():
    with pytest.raises(ValueError, match="no test"):
        fewshot.draw_shots(np.array([0, 0, 1, 1, 1]), 2, np.random.default_rng(0))


@pytest.mark.parametrize("method", fewshot.FEWSHOT_METHODS)
def test_each_method_separates_well_separated_classes(method):
    if method in fewshot.SKLEARN_METHODS:
        pytest.importorskip("sklearn")
    x, y = _blobs()
    train, test = fewshot.draw_shots(y, 5, np.random.default_rng(1))
    clean, shifted = fewshot.fit_predict_scores(
        method, x[train], y[train], [x[test], x[test][:3]], 4, seed=0
    )
    assert clean.shape == (len(test), 4) and shifted.shape == (3, 4)
    assert np.mean(clean.argmax(1) == y[test]) >= 0.9


@pytest.mark.parametrize("method", ["knn", "clip-logreg"])
def test_a_class_without_training_items_scores_lowest(method):
    if method in fewshot.SKLEARN_METHODS:
        pytest.importorskip("sklearn")
    x, y = _blobs(n_classes=3)
    keep = y != 2
    [scores] = fewshot.fit_predict_scores(method, x[keep], y[keep], [x], 3)
    assert (scores[:, 2] < scores[:, :2].min(axis=1)).all()


def test_leave_one_out_class_means_match_a_direct_computation():
    x, y = _blobs(n_classes=3, per_class=4)
    loo = fewshot.leave_one_out_class_mean_similarity(x, y, 3)
    for i in [0, 5, 11]:
        mask = np.arange(len(y)) != i
        direct = fewshot.class_mean_similarity(x[mask], y[mask], x[i : i + 1], 3)[0]
        assert loo[i] == pytest.approx(direct)


def test_leave_one_out_with_one_shot_marks_the_empty_class():
    x, y = _blobs(n_classes=3, per_class=1)
    loo = fewshot.leave_one_out_class_mean_similarity(x, y, 3)
    assert np.isnan(loo[np.arange(3), y]).all()
    assert not np.isnan(loo[0, 1:]).any()
