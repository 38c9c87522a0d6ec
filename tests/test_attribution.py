"""Ranking, scores, margin and 'unknown' from per-generator distances."""

import math

import pytest

from resynth_index.pipeline.attribution import (
    UNKNOWN,
    aggregate,
    attribute,
    similarity_to_distance,
    softmax_scores,
)


def test_distances_from_similarity() -> None:
    assert similarity_to_distance(1.0) == 0.0
    assert similarity_to_distance(0.25, "cosine") == 0.75
    assert similarity_to_distance(0.0, "euclidean") == pytest.approx(math.sqrt(2))
    assert similarity_to_distance(1.0000001, "euclidean") == 0.0  # rounding never goes negative


def test_aggregation() -> None:
    assert aggregate([0.3, 0.1, 0.2], "min") == 0.1
    assert aggregate([0.3, 0.1, 0.2], "mean") == pytest.approx(0.2)
    with pytest.raises(ValueError):
        aggregate([], "min")


def test_softmax_matches_hand_computation() -> None:
    scores = softmax_scores([0.1, 0.2], temperature=0.1)
    e1, e2 = math.exp(-1.0), math.exp(-2.0)
    assert scores == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2)])
    assert sum(softmax_scores([5.0, 7.0, 9.0], 0.01)) == pytest.approx(1.0)


def test_ranking_margin_and_unranked() -> None:
    outcome = attribute(
        {"b": [0.30, 0.20], "a": [0.25], "mj": []}, aggregation="min", temperature=0.05
    )
    assert [g.generator for g in outcome.ranking] == ["b", "a"]
    assert outcome.verdict == "b"
    assert outcome.margin == pytest.approx(0.05)
    assert outcome.unranked == ["mj"]
    assert outcome.ranking[0].distances == (0.30, 0.20)
    mean = attribute({"b": [0.30, 0.20], "a": [0.25]}, aggregation="mean")
    assert mean.verdict == "a"


def test_threshold_gives_unknown() -> None:
    assert attribute({"a": [0.4]}, threshold=0.3).verdict == UNKNOWN
    assert attribute({"a": [0.2]}, threshold=0.3).verdict == "a"
    assert attribute({"a": []}).verdict == UNKNOWN


def test_ties_break_by_name_for_reproducibility() -> None:
    outcome = attribute({"z": [0.1], "m": [0.1]})
    assert [g.generator for g in outcome.ranking] == ["m", "z"]
