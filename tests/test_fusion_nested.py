"""The fused weights' accuracies: in-sample (training) and nested leave-one-out.

The weights are the best of a grid by accuracy on the references, so their accuracy on those
same references flatters them; the nested leave-one-out accuracy scores each reference with the
weights the rule chooses without it. Checked here on pure noise (where only the nested figure is
near chance) and against a brute force that re-runs the rule once per reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from resynth_index.attribution.calibration.fusion_weights import fusion_weight_choice, weight_grid
from resynth_index.attribution.combination import fixed_weights, fuse

NAMES = ("layer-1", "reconstruction", "resynthesis")


def _noise(seed: int, references: int, candidates: int, discrete: bool = False):
    """Random distances of every signal (no signal knows the generator) and random labels;
    ``discrete``: few distinct values and some missing ones, so ties and NaN are exercised."""
    rng = np.random.default_rng(seed)
    train = {}
    for name in NAMES:
        shape = (references, candidates)
        values = rng.integers(0, 3, size=shape).astype(float) if discrete else rng.random(shape)
        if discrete:
            values[rng.random(shape) < 0.15] = np.nan
        train[name] = values
    return train, rng.integers(0, candidates, size=references)


def _brute_force_choice(train, y, prior, step):
    """The rule as written: every grid vector fused with ``fuse``, the most hits, then the
    closest (L1) to the normalised prior, then the first in grid order."""
    names = sorted(train)
    prior_vector = np.array([prior[n] for n in names]) / sum(prior.values())
    best = None
    for order, weights in enumerate(weight_grid(names, step)):
        if len(y):
            scores, _covered = fuse(train, weights)
            hits = int((scores.argmax(axis=1) == y).sum())
        else:
            hits = 0
        vector = np.array([weights[n] for n in names])
        closeness = round(float(np.abs(vector / vector.sum() - prior_vector).sum()), 9)
        key = (-hits, closeness, order)
        if best is None or key < best[0]:
            best = (key, weights)
    assert best is not None
    return best[1], -best[0][0]


def _brute_force_nested(train, y, prior, step):
    """Reference i scored with the weights the rule chooses on all the others, for every i."""
    right = []
    for i in range(len(y)):
        others = np.arange(len(y)) != i
        rest = {name: values[others] for name, values in train.items()}
        weights, _ = _brute_force_choice(rest, y[others], prior, step)
        scores, _covered = fuse({k: v[i : i + 1] for k, v in train.items()}, weights)
        right.append(int(scores[0].argmax()) == int(y[i]))
    return float(np.mean(right))


def test_on_pure_noise_only_the_nested_figure_is_near_chance():
    """Random distances, 4 candidates, 40 references, 3 signals (66 grid vectors), 20 seeded
    draws: the best of the grid scores well above chance on the references it was chosen on;
    held out of the choice, each reference is hit at chance."""
    training, nested = [], []
    for seed in range(20):
        train, y = _noise(seed, references=40, candidates=4)
        choice = fusion_weight_choice(train, y, fixed_weights(NAMES, {}))
        training.append(choice.training_accuracy)
        nested.append(choice.nested_loo_accuracy)
    chance = 0.25
    assert np.mean(training) > chance + 0.08
    assert abs(np.mean(nested) - chance) < 0.05
    assert all(t >= n for t, n in zip(training, nested, strict=True))  # in-sample never lower


@pytest.mark.parametrize("seed", range(4))
def test_the_nested_figure_is_the_rule_rerun_without_each_reference(seed):
    """Small cases with ties and missing values, against a brute force: the weights, the
    training accuracy and the nested leave-one-out accuracy are those of the plain rule."""
    train, y = _noise(seed, references=9, candidates=3, discrete=True)
    prior = fixed_weights(NAMES, {}) if seed % 2 else {"resynthesis": 2.0, "layer-1": 1.0}
    prior = {n: prior.get(n, 0.0) for n in NAMES}
    step = 0.25
    choice = fusion_weight_choice(train, y, prior, step)
    weights, hits = _brute_force_choice(train, y, prior, step)
    assert choice.weights == weights
    assert choice.training_accuracy == pytest.approx(hits / len(y), abs=1e-12)
    assert choice.grid_size == len(weight_grid(NAMES, step)) == 15
    expected = _brute_force_nested(train, y, prior, step)
    assert choice.nested_loo_accuracy == pytest.approx(expected, abs=1e-12)


def test_one_reference_or_none():
    """One reference: held out, nothing is left to choose on, so every vector ties and the
    prior's wins; no reference: no accuracy at all."""
    train, y = _noise(0, references=1, candidates=3)
    choice = fusion_weight_choice(train, y, fixed_weights(NAMES, {}))
    equal = fusion_weight_choice({k: v[:0] for k, v in train.items()}, y[:0], {})
    assert equal.weights == {"layer-1": 0.3, "reconstruction": 0.3, "resynthesis": 0.4}
    assert np.isnan(equal.training_accuracy) and np.isnan(equal.nested_loo_accuracy)
    scores, _ = fuse(train, equal.weights)
    assert choice.nested_loo_accuracy == float(scores[0].argmax() == y[0])
