"""Fusing resynthesis with reconstruction: the rule, the weights, aeroblade, families, queries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from resynth_index.attribution.answer import INCONCLUSIVE, UNKNOWN, QueryResult, RankedGenerator
from resynth_index.attribution.combination import (
    apply_fusion,
    fuse,
    fuse_one,
    nan_zscore_rows,
    parse_weights,
)
from resynth_index.cli import cli
from resynth_index.errors import RsxError
from resynth_index.evaluation import protocol
from resynth_index.evaluation.fusion import (
    FusionSignals,
    choose_fusion_weights,
    family_breakdown,
    family_index,
    parse_families,
    weight_grid,
)
from resynth_index.evaluation.protocol import EvalConfig, run_protocol

nan = float("nan")


# ----------------------------------------------------------------------------- the rule
def test_zscores_ignore_missing_values_and_constant_rows():
    z = nan_zscore_rows(np.array([[1.0, 3.0, nan], [2.0, 2.0, 2.0]]))
    np.testing.assert_allclose(z[0, :2], [-1.0, 1.0])
    assert np.isnan(z[0, 2])
    np.testing.assert_array_equal(z[1], [0.0, 0.0, 0.0])


def test_a_candidate_falls_back_to_the_signals_it_has_and_one_without_any_ranks_last():
    resynthesis = np.array([[0.1, 0.3, 0.2, nan]])  # d: lower = closer
    reconstruction = np.array([[0.5, 0.4, nan, nan]])  # candidate 2 has no autoencoder
    scores, covered = fuse(
        {"resynthesis": resynthesis, "reconstruction": reconstruction},
        {"resynthesis": 1.0, "reconstruction": 1.0},
    )
    assert covered.tolist() == [[True, True, True, False]]
    z_res = nan_zscore_rows(-resynthesis)[0]
    z_rec = nan_zscore_rows(-reconstruction)[0]
    assert scores[0, 0] == pytest.approx((z_res[0] + z_rec[0]) / 2)
    assert scores[0, 2] == pytest.approx(z_res[2])  # resynthesis alone
    assert scores[0, 3] < scores[0, :3].min()  # nothing known: last
    only_res, _ = fuse(
        {"resynthesis": resynthesis, "reconstruction": reconstruction}, {"resynthesis": 1.0}
    )
    np.testing.assert_allclose(only_res[0, :3], z_res[:3])
    with pytest.raises(RsxError, match="unknown signal"):
        fuse({"resynthesis": resynthesis}, {"layer-9": 1.0})


def test_weights_parse_and_refuse_nonsense():
    assert parse_weights("resynthesis=1, reconstruction=0.5") == {
        "resynthesis": 1.0,
        "reconstruction": 0.5,
    }
    assert parse_weights(None) == {}
    for bad in ("resynthesis", "resynthesis=-1", "=2", "resynthesis=x"):
        with pytest.raises(RsxError, match="cannot read fusion weight"):
            parse_weights(bad)


# ----------------------------------------------------------------------------- weights
def test_the_grid_covers_the_simplex():
    grid = weight_grid(["a", "b", "c"], 0.5)
    assert len(grid) == 6 and all(sum(w.values()) == pytest.approx(1) for w in grid)


def test_weights_are_chosen_by_training_accuracy_with_ties_to_the_prior():
    y = np.array([0, 1, 2])
    right = np.array([[0.1, 0.5, 0.5], [0.5, 0.1, 0.5], [0.5, 0.5, 0.1]])
    wrong = np.array([[0.5, 0.1, 0.5], [0.1, 0.5, 0.5], [0.5, 0.1, 0.5]])
    weights, accuracy = choose_fusion_weights(
        {"resynthesis": wrong, "reconstruction": right}, y, {"resynthesis": 1, "reconstruction": 1}
    )
    assert accuracy == 1.0 and weights["reconstruction"] > weights["resynthesis"]
    # both signals right: every weight ties, and the prior (equal) wins the tie
    tied, _ = choose_fusion_weights(
        {"resynthesis": right, "reconstruction": right}, y, {"resynthesis": 1, "reconstruction": 1}
    )
    assert tied == {"reconstruction": 0.5, "resynthesis": 0.5}


def _synthetic(seed=0):
    """4 generators, 8 references each; 0 and 1 are look-alikes that resynthesis confuses and
    the reconstruction tells apart; generator 3 has no autoencoder."""
    from test_evaluation import synthetic_data

    data = synthetic_data(seed=seed)
    rng = np.random.default_rng(seed)
    n = len(data.labels)
    recon = rng.normal(0.5, 0.05, size=(n, data.n_classes))
    recon[np.arange(n), data.labels] -= 0.2
    recon[:, 3] = nan
    signals = FusionSignals({"none": {"reconstruction": recon}}, {"gen-3": "imported"}, "test")
    return data, signals


def _split(data, shots=2, seed=0):
    from resynth_index.evaluation.fewshot import draw_shots

    rng = np.random.default_rng(seed)
    return draw_shots(data.labels, shots, rng, classes=np.arange(data.n_classes))


def _loo_weights(data, signals, train, test):
    distances = {"none": data.resynthesis_distances(data.features)}
    outcome = protocol._score_split(
        data, "fused-loo", {"none": data.features}, distances, train, test,
        np.arange(data.n_classes), 0, signals, {},
    )  # fmt: skip
    return outcome["none"].extra["fusion_weights"]


def test_fusion_weights_never_look_at_test_queries():
    """Shuffling the test labels, or changing every test query's signals, leaves the chosen
    weights as they were: they come from the training references alone."""
    data, signals = _synthetic()
    train, test = _split(data)
    chosen = _loo_weights(data, signals, train, test)
    rng = np.random.default_rng(7)
    shuffled = data.labels.copy()
    shuffled[test] = rng.permutation(shuffled[test])
    assert (shuffled[test] != data.labels[test]).any()
    data.labels = shuffled
    assert _loo_weights(data, signals, train, test) == chosen
    changed = signals.values["none"]["reconstruction"].copy()
    changed[test] = rng.normal(size=changed[test].shape)
    signals.values["none"]["reconstruction"] = changed
    assert _loo_weights(data, signals, train, test) == chosen


def test_fused_loo_records_its_training_and_nested_accuracies():
    """Each split of ``fused-loo`` records the in-sample accuracy of its weights on the training
    references (``train_accuracy``) and the rule's nested leave-one-out on them."""
    from resynth_index.attribution.calibration.fusion_weights import fusion_weight_choice
    from resynth_index.attribution.combination import fixed_weights

    data, signals = _synthetic()
    train, test = _split(data, shots=4)
    distances = {"none": data.resynthesis_distances(data.features)}
    known = np.arange(data.n_classes)
    extra = protocol._score_split(
        data, "fused-loo", {"none": data.features}, distances, train, test, known, 0, signals, {}
    )["none"].extra
    arrays = {
        "resynthesis": distances["none"][train],
        "reconstruction": signals.values["none"]["reconstruction"][train],
    }
    choice = fusion_weight_choice(arrays, data.labels[train], fixed_weights(sorted(arrays), {}))
    assert extra["fusion_weights"] == choice.weights
    assert extra["train_accuracy"] == choice.training_accuracy
    assert extra["nested_loo_accuracy"] == choice.nested_loo_accuracy
    assert extra["nested_loo_accuracy"] <= extra["train_accuracy"]


def test_aeroblade_ranks_unsupported_candidates_last_and_names_them():
    data, signals = _synthetic()
    train, test = _split(data)
    distances = {"none": data.resynthesis_distances(data.features)}
    known = np.arange(data.n_classes)
    outcome = protocol._score_split(
        data, "aeroblade", {"none": data.features}, distances, train, test, known, 0, signals, {}
    )["none"]
    assert outcome.extra["unsupported"] == ["gen-3"]
    assert (outcome.scores[:, 3] < np.delete(outcome.scores, 3, axis=1).min(axis=1)).all()


# ----------------------------------------------------------------------------- families
def test_families_are_parsed_explicitly_and_checked():
    assert parse_families("a+a-ft, b+b-1+b-2") == (("a", "a-ft"), ("b", "b-1", "b-2"))
    assert parse_families(None) == ()
    with pytest.raises(RsxError, match="at least two"):
        parse_families("a")
    with pytest.raises(RsxError, match="more than one family"):
        parse_families("a+b,b+c")
    with pytest.raises(RsxError, match="not evaluated: z"):
        family_index((("a", "z"),), ["a", "b"])


def test_family_breakdown_counts_within_across_and_family_hits():
    family_of = family_index((("a", "a-ft"),), ["a", "a-ft", "solo"])  # [0, 0, -1]
    labels = np.array([0, 0, 1, 2, 2])
    predicted = np.array([0, 1, 1, 2, 0])
    out = family_breakdown(labels, predicted, family_of, np.arange(3))
    assert out["within"] == pytest.approx(2 / 3) and out["across"] == pytest.approx(1 / 2)
    assert out["family"] == pytest.approx(4 / 5)  # 0 -> a-ft is a family hit
    assert (out["within_queries"], out["across_queries"]) == (3, 2)
    # with a-ft held out, a has no look-alike among the candidates: its queries are across
    held = family_breakdown(labels[[0, 3]], np.array([0, 2]), family_of, np.array([0, 2]))
    assert held["within_queries"] == 0 and held["across"] == 1.0


def test_protocol_reports_new_methods_and_the_family_breakdown():
    pytest.importorskip("sklearn")
    data, signals = _synthetic()
    config = EvalConfig(
        shots=(1, 2), repeats=2, seed=1,
        methods=("resynthesis", "aeroblade", "fused", "fused-loo"),
        families=(("gen-0", "gen-1"),),
    )  # fmt: skip
    summary = run_protocol(data, config, {"none": data.features}, signals=signals)
    json.dumps(summary)
    fused = protocol.result_for(summary, "none", "fused", 1)
    assert fused["fusion_weights"] == [{"resynthesis": 0.5, "reconstruction": 0.5}] * 2
    for method in config.methods:
        entry = protocol.result_for(summary, "none", method, 2)
        assert set(entry["families"]) == {"within", "across", "family", "queries"}
        assert entry["families"]["queries"]["within"] == [12, 12]  # 2 generators x 6 tested
    assert summary["fusion"]["unsupported"] == {"gen-3": "imported"}
    assert any("gen-3" in note for note in summary["notes"])
    assert summary["fusion_goal"] and summary["fusion_goal"][0]["shots"] == 1
    from resynth_index.evaluation.report import terminal_text

    text = terminal_text(summary)
    assert "1-shot within" in text and "look-alike goal at 1 shot" in text


def test_fusion_methods_need_their_signals():
    pytest.importorskip("sklearn")
    data, _signals = _synthetic()
    with pytest.raises(RsxError, match="need reconstruction signals"):
        run_protocol(data, EvalConfig(methods=("fused",), shots=(1,)), {"none": data.features})


# ----------------------------------------------------------------------------- queries
def _answer(verdict="toy-a", ranked=3) -> QueryResult:
    """A resynthesis answer: toy-a closest, then toy-b, toy-c; mj (imported) not compared."""
    ranking = [
        RankedGenerator("toy-a", 0.10, 0.5, [0.10], "s1"),
        RankedGenerator("toy-b", 0.12, 0.4, [0.12], "s2"),
        RankedGenerator("toy-c", 0.30, 0.1, [0.30], "s3"),
    ][:ranked]
    return QueryResult(
        image="q.png", sha256="q", caption="c", caption_source="explicit", verdict=verdict,
        ranking=ranking, margin=0.02, generated=0, reused=ranked, pending=[], not_generated=[],
        candidates=[*(e.generator for e in ranking), "mj"], distance="cosine",
        aggregation="min", fingerprints={},
    )  # fmt: skip


def test_a_fused_answer_records_method_signals_and_follows_the_fused_ranking():
    given = _answer()
    reconstruction = {"toy-a": 0.30, "toy-b": 0.01, "toy-c": 0.31, "mj": None}
    result = apply_fusion(given, reconstruction, unsupported={"mj": "imported"})
    assert given.method == "resynthesis" and given.fusion is None  # a new answer
    assert result.method == "fused" and result.verdict == "toy-b"
    assert [e.generator for e in result.ranking] == ["toy-b", "toy-a", "toy-c"]
    assert result.fusion["signals"]["reconstruction"] == reconstruction
    assert result.fusion["signals"]["resynthesis"] == {
        "toy-a": 0.10, "toy-b": 0.12, "toy-c": 0.30, "mj": None,
    }  # fmt: skip
    assert result.fusion["order"][-1] == "mj"  # no signal at all: last
    assert result.fusion["unsupported"] == {"mj": "imported"}
    assert sum(e.score for e in result.ranking) == pytest.approx(1.0)
    assert json.loads(json.dumps(result.to_json()))["method"] == "fused"
    assert QueryResult.from_json(result.to_json()).fusion == result.fusion
    unknown = apply_fusion(_answer(UNKNOWN), reconstruction)
    assert unknown.verdict == UNKNOWN  # the threshold is the resynthesis method's
    # two candidates: each z-score is +1 or -1, so opposite signals cancel exactly
    tie = apply_fusion(_answer(ranked=2), {"toy-a": 0.02, "toy-b": 0.0})
    assert tie.verdict == INCONCLUSIVE and set(tie.tied) == {"toy-a", "toy-b"}


def test_fuse_one_orders_by_score_then_name():
    ranking = fuse_one(["b", "a"], {"resynthesis": {"a": 0.1, "b": 0.1}})
    assert ranking.order == ["a", "b"] and ranking.weights == {"resynthesis": 1.0}


@pytest.mark.slow
def test_rsx_query_method_fused_end_to_end(toy_lab, make_toy_image):
    image = make_toy_image("toy-b", "a red bicycle")
    runner = CliRunner()
    base = ["--lab", str(toy_lab), "query", str(image), "--caption", "a red bicycle", "--json"]
    fused = runner.invoke(cli, [*base, "--method", "fused"])
    assert fused.exit_code == 0, fused.output
    answer = json.loads(fused.stdout.strip().splitlines()[-1])
    assert answer["method"] == "fused" and answer["verdict"] == "toy-b"
    signals = answer["fusion"]["signals"]
    assert set(signals) == {"resynthesis", "reconstruction"}
    assert set(signals["reconstruction"]) == {"toy-a", "toy-b", "toy-c"}
    assert min(signals["reconstruction"], key=signals["reconstruction"].get) == "toy-b"
    plain = runner.invoke(cli, base)
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout.strip().splitlines()[-1])["method"] == "resynthesis"


def test_open_set_numbers_of_the_fusion_methods_are_finite():
    pytest.importorskip("sklearn")
    data, signals = _synthetic()
    signals.values["none"]["reconstruction"][:3] = nan  # queries no autoencoder could redraw
    config = EvalConfig(
        shots=(2,), repeats=2, seed=3, holdout_unknown=1,
        methods=("aeroblade", "fused", "fused-loo"),
    )  # fmt: skip
    summary = run_protocol(data, config, {"none": data.features}, signals=signals)
    json.dumps(summary)
    for method in config.methods:
        open_set = protocol.result_for(summary, "none", method, 2)["open_set"]
        assert 0 <= open_set["auroc"]["mean"] <= 1
