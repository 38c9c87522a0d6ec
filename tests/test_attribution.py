"""Ranking, scores, margin and 'unknown' from per-generator distances."""

import math

import pytest

from resynth_index.attribution.answer import (
    CLOSED_SET_NOTE,
    INCONCLUSIVE,
    NO_EVIDENCE,
    UNKNOWN,
    exact_match_note,
    no_evidence_note,
    score_meaning,
)
from resynth_index.attribution.evidence.resynthesis import aggregate, similarity_to_distance
from resynth_index.attribution.verdict import attribute, softmax_scores


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
    mean = attribute({"b": [0.30, 0.22], "a": [0.25]}, aggregation="mean")
    assert mean.verdict == "a"  # b's mean, 0.26, is behind a (its min, 0.22, is ahead)
    assert attribute({"b": [0.30, 0.20], "a": [0.25]}, aggregation="mean").verdict == INCONCLUSIVE


def test_threshold_gives_unknown_with_its_reason() -> None:
    beyond = attribute({"a": [0.4], "b": [0.5]}, threshold=0.3)
    assert beyond.verdict == UNKNOWN
    assert beyond.reason == "beyond threshold 0.3: best a at 0.4"
    assert beyond.threshold == 0.3
    within = attribute({"a": [0.2]}, threshold=0.3)
    assert within.verdict == "a"
    assert CLOSED_SET_NOTE not in within.reason  # a threshold makes it open-set


def test_no_resynthesis_at_all_is_no_evidence_not_unknown() -> None:
    outcome = attribute({"a": [], "mj": []})
    assert outcome.verdict == NO_EVIDENCE
    assert outcome.unranked == ["a", "mj"]
    assert "a, mj" in outcome.reason


def test_a_near_tie_is_inconclusive_and_names_the_tied() -> None:
    distances = {"alpha": [0.0031], "alpha-ft": [0.0031029], "beta": [0.2]}
    outcome = attribute(distances, margin_floor=0.001)
    assert outcome.verdict == INCONCLUSIVE
    assert outcome.tied == ["alpha", "alpha-ft"]
    assert "alpha and alpha-ft" in outcome.reason
    assert attribute(distances, margin_floor=0.0).verdict == "alpha"  # no floor: firm
    clear = attribute({"alpha": [0.01], "beta": [0.2]}, margin_floor=0.001)
    assert clear.verdict == "alpha" and clear.tied == []


def test_a_closed_set_answer_says_so() -> None:
    outcome = attribute({"a": [0.1], "b": [0.3]})
    assert outcome.verdict == "a"
    assert outcome.reason.endswith(CLOSED_SET_NOTE)


def test_ties_break_by_name_for_reproducibility() -> None:
    outcome = attribute({"z": [0.1], "m": [0.1]})
    assert [g.generator for g in outcome.ranking] == ["m", "z"]


def test_an_exact_tie_is_inconclusive_even_without_a_margin_floor() -> None:
    # two generators that resynthesise identically (the same weights under two names)
    outcome = attribute({"twin": [0.04], "toy-a": [0.04], "other": [0.3]}, margin_floor=0.0)
    assert outcome.verdict == INCONCLUSIVE
    assert outcome.tied == ["toy-a", "twin"]
    assert outcome.reason == "toy-a and twin are exactly tied at 0.04: nothing tells them apart"


def test_three_within_the_floor_are_all_named() -> None:
    outcome = attribute({"a": [0.1], "b": [0.1005], "c": [0.1009], "d": [0.5]}, margin_floor=0.001)
    assert outcome.tied == ["a", "b", "c"]
    assert outcome.reason.startswith("a, b and c lie within the margin floor 0.001")


def test_a_threshold_wins_over_a_tie_and_is_recorded() -> None:
    outcome = attribute({"a": [0.4], "b": [0.4]}, threshold=0.3, margin_floor=0.01)
    assert outcome.verdict == UNKNOWN and outcome.tied == []
    assert (outcome.threshold, outcome.margin_floor) == (0.3, 0.01)


def test_a_single_candidate_scores_one_which_is_why_the_score_is_called_relative() -> None:
    outcome = attribute({"only": [0.9]})
    assert outcome.ranking[0].score == 1.0
    assert score_meaning(0.05) == "relative among candidates (softmax of -distance/0.05)"
    assert score_meaning(0.2) == "relative among candidates (softmax of -distance/0.2)"


def test_notes_for_no_evidence_and_for_a_query_that_is_a_resynthesis() -> None:
    assert no_evidence_note(NO_EVIDENCE, ["a", "mj"]) == (
        "no evidence: no resynthesis of this caption by a, mj"
    )
    assert no_evidence_note("a", ["mj"]) == ""
    assert exact_match_note([]) == ""
    assert exact_match_note(["sd15"]) == (
        "this image is itself a stored resynthesis by sd15:"
        " a distance of 0 says nothing about its origin"
    )
