"""Conformal prediction sets, temperature fitting and calibration error (pure numpy), and the
conformal part of the evaluation on synthetic distances. Every simulation is seeded."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from resynth_index.attribution.calibration import conformal
from resynth_index.attribution.calibration.conformal import (
    Calibration,
    TooFewReferences,
    calibrate,
    conformal_quantile,
    expected_calibration_error,
    fit_temperature,
    mondrian_quantiles,
    prediction_set,
)
from resynth_index.errors import RsxError
from resynth_index.evaluation.conformal_eval import (
    MARGINAL,
    PER_GENERATOR,
    ConformalSettings,
    conformal_result,
    evaluate_conformal,
    parse_coverages,
)

COVERAGES = (0.5, 0.8, 0.9, 0.95, 0.99, 0.123)


def brute_force_quantile(scores, coverage):
    """The smallest score s with #{scores <= s} >= (n + 1) * coverage; None when none is."""
    level = (len(scores) + 1) * Fraction(str(coverage))
    eligible = [s for s in scores if sum(t <= s for t in scores) >= level]
    return min(eligible) if eligible else None


def simulate_labels(distances, temperature, rng):
    """Draw each row's true generator from softmax(-d / T)."""
    p = conformal.softmax_probabilities(distances, temperature)
    return (p.cumsum(axis=1) > rng.uniform(size=(len(p), 1))).argmax(axis=1)


# ----------------------------------------------------------------------------- quantiles
@pytest.mark.parametrize("coverage", COVERAGES)
def test_quantile_matches_brute_force_for_every_n(coverage):
    rng = np.random.default_rng(0)
    for n in range(1, 120):
        for scores in (rng.uniform(size=n), rng.integers(0, 4, size=n).astype(float)):  # ties
            expected = brute_force_quantile(list(scores), coverage)
            if expected is None:
                with pytest.raises(TooFewReferences):
                    conformal_quantile(scores, coverage)
            else:
                assert conformal_quantile(scores, coverage) == expected


def test_references_needed_is_the_first_n_with_a_finite_quantile():
    for coverage in COVERAGES:
        needed = conformal.references_needed(coverage)
        assert brute_force_quantile([0.0] * needed, coverage) is not None
        assert brute_force_quantile([0.0] * (needed - 1), coverage) is None
    assert conformal.references_needed(0.9) == 9 and conformal.references_needed(0.95) == 19


def test_too_few_references_are_refused_naming_how_many_are_needed():
    with pytest.raises(TooFewReferences, match=r"95 % coverage needs at least 19 .*; got 18"):
        conformal_quantile(np.linspace(0, 1, 18), 0.95)
    assert conformal_quantile(np.linspace(0, 1, 19), 0.95) == 1.0
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(RsxError, match="strictly between 0 and 1"):
            conformal_quantile([0.1, 0.2], bad)


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_coverage_holds_on_exchangeable_scores(coverage):
    """2,000 calibrations of n = 50 scores, 50 test scores each: mean coverage is
    ceil(51 a) / 51 (its standard error here is about 0.001), inside [a, a + 1/51)."""
    rng = np.random.default_rng(11)
    n, tests, repetitions = 50, 50, 2000
    covered = []
    for _ in range(repetitions):
        scores = rng.gamma(2.0, size=n + tests)
        q = conformal_quantile(scores[:n], coverage)
        covered.append(np.mean(scores[n:] <= q))
    exact = math.ceil((n + 1) * coverage) / (n + 1)
    assert abs(np.mean(covered) - exact) < 0.005
    assert coverage - 0.005 < np.mean(covered) < coverage + 1 / (n + 1)


def test_prediction_sets_cover_the_true_generator_on_simulated_attribution():
    """Distances to 5 candidates, the true generator drawn from softmax(-d / 0.1): sets from a
    fitted calibration hold the true generator in about 90 % of fresh queries."""
    rng = np.random.default_rng(5)
    names = [f"g{i}" for i in range(5)]
    covered, sizes = [], []
    for _ in range(300):
        d = rng.uniform(0.2, 0.8, size=(80, 5))
        y = simulate_labels(d, 0.1, rng)
        fitted = calibrate(
            d[:40], y[:40], names, coverage=0.9, reference_ids=range(40), **_identity(names)
        )
        for row, label in zip(d[40:], y[40:], strict=True):
            chosen = fitted.prediction_set(dict(zip(names, row, strict=True)))
            covered.append(names[label] in chosen)
            sizes.append(len(chosen))
    assert abs(np.mean(covered) - 0.9) < 0.02
    assert 1 < np.mean(sizes) < 5  # informative: fewer than every candidate


# ----------------------------------------------------------------------------- sets
def test_prediction_set_keeps_what_passes_most_plausible_first_and_may_be_empty():
    scores = {"a": 0.30, "b": 0.05, "c": 0.70}
    assert prediction_set(scores, 0.5) == ["b", "a"]
    assert prediction_set(scores, 0.01) == []  # none of the candidates at this coverage
    assert prediction_set(scores, {"a": 0.2, "b": 0.1, "c": 0.9}) == ["b", "c"]
    with pytest.raises(ValueError, match="'c'"):
        prediction_set(scores, {"a": 0.2, "b": 0.1})


def test_mondrian_gives_every_group_its_coverage_where_one_threshold_does_not():
    """Three groups whose scores differ in scale (x0.1, x1, x10): one pooled threshold covers the
    wide group far too little; per-group thresholds cover each at about 90 %."""
    rng = np.random.default_rng(2)
    scales = {"narrow": 0.1, "middle": 1.0, "wide": 10.0}
    n, tests = 40, 40
    pooled = {g: [] for g in scales}
    mondrian = {g: [] for g in scales}
    for _ in range(1000):
        cal = {g: s * rng.exponential(size=n) for g, s in scales.items()}
        test = {g: s * rng.exponential(size=tests) for g, s in scales.items()}
        groups = [g for g in scales for _ in range(n)]
        values = np.concatenate([cal[g] for g in scales])
        q_all = conformal_quantile(values, 0.9)
        q_group = mondrian_quantiles(values, groups, 0.9)
        for g in scales:
            pooled[g].append(np.mean(test[g] <= q_all))
            mondrian[g].append(np.mean(test[g] <= q_group[g]))
    exact = math.ceil((n + 1) * 0.9) / (n + 1)
    for g in scales:
        assert abs(np.mean(mondrian[g]) - exact) < 0.01, g
    assert np.mean(pooled["wide"]) < 0.8 and np.mean(pooled["narrow"]) > 0.99


def test_mondrian_refuses_the_group_with_too_few_references():
    scores = np.linspace(0, 1, 30)
    groups = ["a"] * 20 + ["b"] * 10
    assert set(mondrian_quantiles(scores, groups, 0.9)) == {"a", "b"}
    with pytest.raises(TooFewReferences, match=r"each generator; b has 10") as caught:
        mondrian_quantiles(scores, groups, 0.95)
    assert caught.value.needed == 19 and caught.value.have == 10


# ----------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("temperature", [0.02, 0.1, 0.5])
def test_temperature_fit_recovers_the_simulated_temperature(temperature):
    rng = np.random.default_rng(7)
    d = rng.uniform(0, 1, size=(4000, 5))
    y = simulate_labels(d, temperature, rng)
    fitted = fit_temperature(d, y)
    assert abs(fitted / temperature - 1) < 0.1
    nll = conformal.negative_log_likelihood
    assert nll(d, y, fitted) <= min(nll(d, y, fitted * 0.9), nll(d, y, fitted * 1.1))


def test_perfectly_ranked_references_push_the_temperature_to_its_lower_bound():
    d = np.array([[0.1, 0.5], [0.6, 0.2], [0.3, 0.9]])
    fitted = fit_temperature(d, [0, 1, 0])
    assert fitted == pytest.approx(conformal.TEMPERATURE_BOUNDS[0], rel=1e-3)


def test_ece_is_small_when_calibrated_and_larger_when_not():
    rng = np.random.default_rng(4)
    d = rng.uniform(0, 1, size=(20000, 5))
    y = simulate_labels(d, 0.1, rng)
    calibrated = expected_calibration_error(conformal.softmax_probabilities(d, 0.1), y)
    overconfident = expected_calibration_error(conformal.softmax_probabilities(d, 0.025), y)
    assert calibrated < 0.02
    assert overconfident > 0.1 and overconfident > 5 * calibrated


def test_ece_by_hand():
    # two queries at confidence 0.9 (one right), two at 0.6 (both right): bins 9 and 6
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = [0, 1, 1, 1]
    assert expected_calibration_error(p, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert math.isnan(expected_calibration_error(np.zeros((0, 2)), []))


# ----------------------------------------------------------------------------- the record
def _identity(names):
    return {
        "embedder_fingerprint": "emb-1",
        "generator_fingerprints": {n: f"fp-{n}" for n in names},
        "distance": "cosine",
        "aggregation": "min",
    }


def _calibration(per_generator=False) -> Calibration:
    rng = np.random.default_rng(1)
    names = ["sd15", "sdxl", "mj"]
    d = rng.uniform(0.2, 0.8, size=(90, 3))
    y = simulate_labels(d, 0.1, rng)
    return calibrate(
        d,
        y,
        names,
        coverage=0.9,
        per_generator=per_generator,
        reference_ids=range(100, 190),
        created_at="2025-01-01T00:00:00+00:00",
        **_identity(names),
    )


@pytest.mark.parametrize("per_generator", [False, True])
def test_calibration_round_trips_through_json(per_generator):
    made = _calibration(per_generator)
    back = Calibration.from_dict(json.loads(json.dumps(made.to_dict())))
    assert back == made
    assert back.per_generator == per_generator
    assert (back.quantile is None) == per_generator and bool(back.quantiles) == per_generator
    assert sum(back.references_per_generator.values()) == len(back.reference_ids) == 90
    assert 0.02 < back.temperature < 0.5


def test_calibration_is_read_only():
    made = _calibration(per_generator=True)
    with pytest.raises(AttributeError):
        made.coverage = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        made.quantiles["sd15"] = 1.0  # type: ignore[index]


def test_calibration_applies_only_to_its_embedder_candidates_and_settings():
    made = _calibration()
    fps = dict(made.generator_fingerprints)
    assert made.applies_to("emb-1", fps) is None
    assert made.applies_to("emb-1", fps, distance="cosine", aggregation="min") is None
    assert "embedder" in made.applies_to("emb-2", fps)
    fewer = {k: v for k, v in fps.items() if k != "mj"}
    assert "lacks mj" in made.applies_to("emb-1", fewer)
    assert "adds dalle" in made.applies_to("emb-1", {**fps, "dalle": "fp-dalle"})
    assert "changed since calibration: sdxl" in made.applies_to("emb-1", {**fps, "sdxl": "new"})
    assert "euclidean" in made.applies_to("emb-1", fps, distance="euclidean")
    assert "mean" in made.applies_to("emb-1", fps, aggregation="mean")
    for reason in [made.applies_to("emb-2", fps), made.applies_to("emb-1", fewer)]:
        assert "\n" not in reason


def test_calibration_sets_match_the_functions():
    made = _calibration(per_generator=True)
    distances = {"sd15": 0.30, "sdxl": 0.32, "mj": 0.70}
    scores = made.nonconformity(distances)
    assert made.prediction_set(distances) == prediction_set(scores, dict(made.quantiles))
    assert made.prediction_set(distances)[0] == "sd15"
    with pytest.raises(ValueError, match="exactly the calibrated candidates"):
        made.prediction_set({"sd15": 0.3})


def test_calibration_records_of_another_format_or_incomplete_are_refused():
    record = _calibration().to_dict()
    with pytest.raises(RsxError, match="format"):
        Calibration.from_dict({**record, "format": 99})
    with pytest.raises(RsxError, match="score"):
        Calibration.from_dict({**record, "score": "aps"})
    with pytest.raises(RsxError, match="lacks coverage"):
        Calibration.from_dict({k: v for k, v in record.items() if k != "coverage"})


def test_calibrate_refuses_too_few_references_per_generator():
    rng = np.random.default_rng(0)
    names = ["a", "b"]
    d = rng.uniform(size=(30, 2))
    y = np.array([0] * 25 + [1] * 5)
    args = {"reference_ids": range(30), **_identity(names)}
    assert calibrate(d, y, names, coverage=0.9, **args).quantile is not None
    with pytest.raises(TooFewReferences, match="b has 5"):
        calibrate(d, y, names, coverage=0.9, per_generator=True, **args)


# ----------------------------------------------------------------------------- evaluation
def synthetic_distances(n_per_class=60, n_classes=4, seed=0):
    """Distances whose true generator is drawn from softmax(-d / 0.1), plus a shifted copy
    (noise added to every distance: no longer exchangeable with the clean references)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    d = rng.uniform(0.2, 0.8, size=(len(labels), n_classes))
    # make each row's true column consistent with the labels: draw, then move the drawn column
    drawn = simulate_labels(d, 0.1, rng)
    rows = np.arange(len(labels))
    d[rows, labels], d[rows, drawn] = d[rows, drawn], d[rows, labels].copy()
    noisy = d + rng.normal(scale=0.15, size=d.shape)
    return [f"gen-{c}" for c in range(n_classes)], labels, {"none": d, "noise": noisy}


def test_evaluation_reaches_its_coverage_on_clean_and_shows_the_drop_when_shifted():
    generators, labels, distances = synthetic_distances()
    settings = ConformalSettings(coverages=(0.9,), splits=200, per_generator=True, seed=3)
    section = evaluate_conformal(generators, labels, distances, settings, 0.05, clean="none")
    assert section["calibration_references"] == {g: 30 for g in generators}
    clean = conformal_result(section, "none", 0.9, MARGINAL)
    # 120 calibration scores: the exact mean coverage is ceil(121 * 0.9) / 121 = 0.9008
    assert abs(clean["coverage"]["mean"] - 0.9) < 0.015
    per_group = conformal_result(section, "none", 0.9, PER_GENERATOR)
    for g in generators:
        assert abs(per_group["per_generator"][g]["mean"] - 0.9) < 0.03  # 30 per group
    shifted = conformal_result(section, "noise", 0.9, MARGINAL)
    assert shifted["coverage"]["mean"] < clean["coverage"]["mean"] - 0.05
    quality = {row["condition"]: row for row in section["conditions"]}
    # the fixed temperature 0.05 is sharper than the simulated 0.1: fitting halves the error
    assert quality["none"]["ece_fitted"] < 0.5 * quality["none"]["ece_fixed"]
    assert abs(section["temperature"]["fitted"]["mean"] - 0.1) < 0.02
    for row in section["results"]:
        assert 0 <= row["coverage"]["mean"] <= 1 and 0 <= row["set_size"]["mean"] <= 4
        assert row["singletons"]["mean"] + row["empty"]["mean"] <= 1


def test_evaluation_is_seeded():
    generators, labels, distances = synthetic_distances(n_per_class=20)
    settings = ConformalSettings(coverages=(0.8,), splits=20, seed=1)
    first = evaluate_conformal(generators, labels, distances, settings, 0.05, clean="none")
    again = evaluate_conformal(generators, labels, distances, settings, 0.05, clean="none")
    other = evaluate_conformal(
        generators,
        labels,
        distances,
        ConformalSettings(coverages=(0.8,), splits=20, seed=2),
        0.05,
        clean="none",
    )
    assert first == again and first["results"] != other["results"]


def test_evaluation_refuses_too_few_references_up_front():
    generators, labels, distances = synthetic_distances(n_per_class=10)
    low = ConformalSettings(coverages=(0.9,), per_generator=True)  # 5 per generator calibrate
    with pytest.raises(RsxError, match=r"needs 9 calibration references per generator; gen-0"):
        evaluate_conformal(generators, labels, distances, low, 0.05, clean="none")
    few = ConformalSettings(coverages=(0.99,))
    with pytest.raises(RsxError, match=r"at least 99 calibration references.* gives 20"):
        evaluate_conformal(generators, labels, distances, few, 0.05, clean="none")


def test_coverages_are_parsed_and_checked():
    assert parse_coverages("0.95, 0.9,0.9") == (0.9, 0.95)
    assert parse_coverages(None) == ()
    for bad in ("95", "0.9,x", "0"):
        with pytest.raises(RsxError, match="--conformal"):
            parse_coverages(bad)
