"""The evaluation protocol on synthetic features, and `rsx eval` end to end on a tiny toy lab."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from resynth_index.cli import cli
from resynth_index.errors import RsxError
from resynth_index.evaluation import protocol as evaluation
from resynth_index.evaluation.conformal_eval import MARGINAL, PER_GENERATOR
from resynth_index.evaluation.data import EvalData
from resynth_index.evaluation.protocol import DEFAULT_METHODS, EvalConfig, run_protocol
from resynth_index.evaluation.report import split_lines, terminal_text, write_report


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic_data(n_classes=4, per_class=8, dim=24, seed=0) -> EvalData:
    """Queries = generator style + caption content; resyntheses share the caption content."""
    rng = np.random.default_rng(seed)
    style = rng.normal(size=(n_classes, dim))
    n_captions = per_class
    content = rng.normal(size=(n_captions, dim)) * 2
    labels = np.repeat(np.arange(n_classes), per_class)
    captions = np.tile(np.arange(n_captions), n_classes)
    features = _unit(style[labels] + content[captions] + rng.normal(size=(len(labels), dim)))
    resyntheses = [
        [_unit(style[g] + content[c] + rng.normal(size=(1, dim))) for g in range(n_classes)]
        for c in captions
    ]
    return EvalData(
        generators=[f"gen-{g}" for g in range(n_classes)],
        image_ids=np.arange(len(labels)),
        labels=labels,
        captions=[str(c) for c in captions],
        features=features.astype(np.float32),
        resyntheses=resyntheses,
        distance="cosine",
        aggregation="min",
        temperature=0.05,
    )


def _config(**kw) -> EvalConfig:
    pytest.importorskip("sklearn")
    base = {"shots": (1, 3), "repeats": 2, "seed": 1}
    return EvalConfig(**{**base, **kw})


def test_every_method_and_shot_count_is_reported_with_mean_and_std():
    data = synthetic_data()
    summary = run_protocol(data, _config(), {"none": data.features})
    keys = {(r["method"], r["shots"]) for r in summary["results"]}
    assert keys == {(m, s) for m in DEFAULT_METHODS for s in (1, 3)}
    entry = evaluation.result_for(summary, "none", "resynthesis", 3)
    assert len(entry["accuracy"]["values"]) == 2
    assert 0 <= entry["accuracy"]["mean"] <= 1 and entry["accuracy"]["std"] >= 0
    assert set(entry["per_generator"]) == set(data.generators)
    assert np.sum(entry["confusion"]) == 2 * (len(data.labels) - 3 * 4)  # test queries, 2 repeats
    assert len(summary["hybrid_goal"]) == 2
    json.dumps(summary)  # JSON-able (no NaN, no numpy)


def test_same_seed_same_numbers_other_seed_other_draws():
    data = synthetic_data()
    queries = {"none": data.features}
    config = _config(methods=("resynthesis", "knn"))
    first = run_protocol(data, config, queries)
    assert run_protocol(data, config, queries) == first
    other = run_protocol(data, _config(methods=("resynthesis", "knn"), seed=2), queries)
    assert other["results"] != first["results"]


def test_training_never_sees_a_test_query(monkeypatch):
    data = synthetic_data()
    seen = []
    real = evaluation.fit_predict_scores

    def spy(method, x_train, y_train, x_tests, n_classes, seed=0):
        seen.append((x_train.copy(), x_tests[0].copy()))
        return real(method, x_train, y_train, x_tests, n_classes, seed)

    monkeypatch.setattr(evaluation, "fit_predict_scores", spy)
    run_protocol(data, _config(methods=("knn",), repeats=3), {"none": data.features})
    assert len(seen) == 6
    for x_train, x_test in seen:
        assert len(x_train) + len(x_test) == len(data.labels)
        overlap = (np.abs(x_test[:, None, :] - x_train[None, :, :]).sum(-1) < 1e-9).any()
        assert not overlap


def test_perturbed_condition_and_open_set_are_reported():
    data = synthetic_data(n_classes=5)
    noisy = _unit(data.features + np.random.default_rng(1).normal(size=data.features.shape))
    summary = run_protocol(
        data,
        _config(methods=("resynthesis", "clip-svm", "hybrid"), holdout_unknown=2),
        {"none": data.features, "noise": noisy},
    )
    assert summary["conditions"] == ["none", "noise"]
    entry = evaluation.result_for(summary, "noise", "hybrid", 3)
    assert set(entry["open_set"]) == {
        "auroc",
        "threshold",
        "accuracy",
        "known_accuracy",
        "unknown_recall",
    }
    assert 0 <= entry["open_set"]["auroc"]["mean"] <= 1
    assert all(len(u) == 2 for u in entry["unknown_generators"])


def test_one_repeat_reports_the_mean_alone_and_no_std(tmp_path):
    pytest.importorskip("matplotlib")
    data = synthetic_data()
    summary = run_protocol(
        data, _config(methods=("resynthesis", "knn"), repeats=1), {"none": data.features}
    )
    entry = evaluation.result_for(summary, "none", "knn", 3)
    assert entry["accuracy"]["mean"] is not None and entry["accuracy"]["std"] is None
    assert all(entry[k]["std"] is None for k in ("balanced_accuracy", "top3", "auroc"))
    assert all(stat["std"] is None for stat in entry["per_generator"].values())
    assert json.loads(json.dumps(summary))["results"][0]["accuracy"]["std"] is None
    mean = f"{entry['accuracy']['mean'] * 100:.1f}"
    text = terminal_text(summary)
    assert "±" not in text and "one repeat, so no spread" in text
    knn_row = next(line for line in text.splitlines() if line.startswith("knn "))
    assert knn_row.split()[-1] == mean
    report = write_report(summary, tmp_path / "report")[0].read_text()
    assert "±" not in report and "one repeat, so no spread" in report
    assert "- 1-shot: 28 test queries per repeat (32 references, 4 used for training)" in report
    knn_cells = next(line for line in report.splitlines() if line.startswith("| knn |"))
    assert knn_cells.strip("| ").split(" | ")[-1] == mean  # the clean accuracy table comes first


def test_several_repeats_report_mean_and_std():
    data = synthetic_data()
    summary = run_protocol(data, _config(methods=("resynthesis",)), {"none": data.features})
    entry = evaluation.result_for(summary, "none", "resynthesis", 1)
    assert entry["accuracy"]["std"] is not None
    text = terminal_text(summary)
    assert "mean±std over 2 repeats" in text
    assert f"{entry['accuracy']['mean'] * 100:.1f}±{entry['accuracy']['std'] * 100:.1f}" in text


def _tested_per_repeat(summary, shots, method="resynthesis"):
    """Known queries actually scored per repeat: the confusion matrix sums over repeats."""
    entry = evaluation.result_for(summary, "none", method, shots)
    return np.sum(entry["confusion"]) / summary["repeats"]


def test_query_count_is_what_each_repeat_tested():
    data = synthetic_data(n_classes=5, per_class=3)  # 15 references
    summary = run_protocol(
        data, _config(shots=(1,), methods=("resynthesis",)), {"none": data.features}
    )
    assert summary["reference_count"] == 15
    assert summary["splits"] == [
        {
            "shots": 1,
            "training_references": [5, 5],
            "test_queries": [10, 10],
            "unknown_test_queries": [0, 0],
        }
    ]
    assert _tested_per_repeat(summary, 1) == 10
    expected = "10 test queries per repeat (15 references, 5 used for training)"
    assert split_lines(summary) == [expected]
    assert terminal_text(summary).splitlines()[0] == expected


def test_query_count_per_shot_count_and_with_held_out_generators():
    data = synthetic_data(n_classes=4, per_class=6)  # 24 references
    config = _config(shots=(1, 3), methods=("resynthesis",), holdout_unknown=1)
    summary = run_protocol(data, config, {"none": data.features})
    by_shots = {s["shots"]: s for s in summary["splits"]}
    # 3 known generators train; the held-out one's 6 references are all tested as unknown
    assert by_shots[1]["test_queries"] == [21, 21] and by_shots[3]["test_queries"] == [15, 15]
    assert by_shots[1]["unknown_test_queries"] == [6, 6]
    assert _tested_per_repeat(summary, 1) == 21 - 6 and _tested_per_repeat(summary, 3) == 15 - 6
    assert split_lines(summary) == [
        "1-shot: 21 test queries per repeat (24 references, 3 used for training;"
        " 6 of them from held-out generators, in the open-set numbers only)",
        "3-shot: 15 test queries per repeat (24 references, 9 used for training;"
        " 6 of them from held-out generators, in the open-set numbers only)",
    ]
    assert terminal_text(summary).splitlines()[:2] == split_lines(summary)


def test_shot_counts_that_leave_no_test_query_are_skipped_with_a_note():
    data = synthetic_data(per_class=4)
    summary = run_protocol(
        data, _config(shots=(1, 4), methods=("resynthesis",)), {"none": data.features}
    )
    assert summary["shots"] == [1]
    assert any("skipped" in note for note in summary["notes"])


def test_hybrid_weight_comes_from_leave_one_out():
    y = np.array([0, 0, 1, 1])
    # resynthesis is wrong on the second of each class; the class means are always right
    distance = np.array([[0.1, 0.5], [0.5, 0.1], [0.5, 0.1], [0.1, 0.5]])
    similarity = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    w, accuracy = evaluation.choose_hybrid_weight(distance, similarity, y)
    assert w > 0.5 and accuracy == 1.0
    one_shot = np.array([[np.nan, 0.2], [0.3, np.nan]])
    assert evaluation.choose_hybrid_weight(distance[:2], one_shot, y[:2]) == (
        evaluation.HYBRID_ONE_SHOT_WEIGHT,
        None,
    )


def test_conformal_sets_are_reported_in_json_terminal_and_markdown(tmp_path):
    pytest.importorskip("matplotlib")
    data = synthetic_data(per_class=12)
    noisy = _unit(data.features + np.random.default_rng(1).normal(size=data.features.shape))
    config = _config(
        shots=(1,),
        methods=("resynthesis",),
        conformal=(0.8, 0.9),
        per_generator=True,
        conformal_splits=20,
        calibration_share=0.75,
    )
    summary = run_protocol(data, config, {"none": data.features, "noise": noisy})
    section = json.loads(json.dumps(summary))["conformal"]
    assert section["calibration_references"] == {g: 9 for g in data.generators}
    assert {(r["condition"], r["target"], r["calibration"]) for r in section["results"]} == {
        (c, t, k) for c in ("none", "noise") for t in (0.8, 0.9) for k in (MARGINAL, PER_GENERATOR)
    }
    for row in section["results"]:
        assert 0 <= row["coverage"]["mean"] <= 1 and row["coverage"]["std"] is not None
        assert set(row["per_generator"]) == set(data.generators)
    assert [r["condition"] for r in section["conditions"]] == ["none", "noise"]
    text = terminal_text(summary)
    assert "conformal prediction sets (resynthesis)" in text
    assert "per-generator coverage % on clean queries" in text and "ECE fitted T" in text
    assert "guarantee does not hold" in text  # post-processed queries are shown, not hidden
    report = write_report(summary, tmp_path / "report")[0].read_text()
    assert "## Conformal prediction sets (resynthesis)" in report
    assert "### Per-generator coverage %, queries post-processed: noise" in report


def test_conformal_options_are_checked_before_anything_runs():
    with pytest.raises(RsxError, match="--per-generator goes with --conformal"):
        _config(per_generator=True).validate()
    with pytest.raises(RsxError, match="--calibration-share"):
        _config(conformal=(0.9,), calibration_share=1.0).validate()
    data = synthetic_data()  # 8 references per generator: 4 calibrate
    with pytest.raises(RsxError, match="needs 9 calibration references per generator"):
        run_protocol(data, _config(conformal=(0.9,), per_generator=True), {"none": data.features})


# ----------------------------------------------------------------------------- end to end
CAPTIONS = ["a portrait of a sailor", "a bowl of pears", "a red bicycle", "a snowy cabin"]


@pytest.fixture
def tiny_eval_lab(toy_lab, tmp_path):
    """The toy lab with 4 captioned references per toy generator (seeds resyntheses never use)."""
    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import GenerationRequest

    folder = tmp_path / "refs"
    folder.mkdir()
    runner = CliRunner()
    with Lab.open(toy_lab) as lab:
        rows = {row.name: row for row in lab.generators()}
        made = {
            name: lab.generator_model(row).generate(
                [GenerationRequest(c, 1000 + i) for i, c in enumerate(CAPTIONS)]
            )
            for name, row in rows.items()
        }
    lines = ["path,role,generator,caption"]
    for name, images in made.items():
        for i, image in enumerate(images):
            image.save(folder / f"{name}-{i}.png")
            lines.append(f"{name}-{i}.png,reference,{name},{CAPTIONS[i]}")
    (folder / "refs.csv").write_text("\n".join(lines) + "\n")
    result = runner.invoke(cli, ["--lab", str(toy_lab), "ingest", str(folder / "refs.csv")])
    assert result.exit_code == 0, result.output
    return toy_lab


@pytest.mark.slow
def test_rsx_eval_end_to_end(tiny_eval_lab, tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    runner = CliRunner()
    base = ["--lab", str(tiny_eval_lab), "eval", "--shots", "1,2", "--repeats", "2"]
    out = tmp_path / "report"
    result = runner.invoke(cli, [*base, "--generate", "--perturb", "jpeg,grey", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for method in DEFAULT_METHODS:
        assert method in result.stdout
    assert "1-shot" in result.stdout and "post-processed: jpeg" in result.stdout
    report = (out / "report.md").read_text()
    assert "accuracy_vs_shots.png" in report and "## Queries post-processed: grey" in report
    for name in ["results.json", "accuracy_vs_shots.png", "robustness.png", "confusion_hybrid.png"]:
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["reference_count"] == 12
    assert [(s["shots"], s["test_queries"]) for s in results["splits"]] == [
        (1, [9, 9]),
        (2, [6, 6]),
    ]
    assert "1-shot: 9 test queries per repeat (12 references, 3 used for training)" in result.stdout

    as_json = runner.invoke(cli, [*base, "--json", "--holdout-unknown", "1"])
    assert as_json.exit_code == 0, as_json.output
    summary = json.loads(as_json.stdout)
    assert summary["holdout_unknown"] == 1 and summary["generators"] == ["toy-a", "toy-b", "toy-c"]
    assert "open_set" in evaluation.result_for(summary, "none", "resynthesis", 2)


@pytest.mark.parametrize("method", ["clip-svm", "resynthesis"])  # the metrics need it too
def test_rsx_eval_without_scikit_learn_says_how_to_install(toy_lab, monkeypatch, method):
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)
    result = CliRunner().invoke(cli, ["--lab", str(toy_lab), "eval", "--methods", method])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'resynth-index[eval]'" in lines[0]


@pytest.mark.slow
def test_rsx_eval_conformal_end_to_end(tiny_eval_lab):
    pytest.importorskip("sklearn")
    base = ["--lab", str(tiny_eval_lab), "eval", "--methods", "resynthesis", "--shots", "1"]
    conformal = ["--conformal", "0.5,0.75", "--per-generator", "--calibration-share", "0.75"]
    runner = CliRunner()
    result = runner.invoke(
        cli, [*base, "--generate", *conformal, "--conformal-splits", "20", "--perturb", "jpeg"]
    )
    assert result.exit_code == 0, result.output
    assert "conformal prediction sets (resynthesis)" in result.stdout
    as_json = runner.invoke(cli, [*base, *conformal, "--conformal-splits", "20", "--json"])
    assert as_json.exit_code == 0, as_json.output
    section = json.loads(as_json.stdout)["conformal"]
    assert section["splits"] == 20 and section["coverages"] == [0.5, 0.75]
    assert section["calibration_references"] == {"toy-a": 3, "toy-b": 3, "toy-c": 3}
    assert len(section["results"]) == 4  # 2 targets x (marginal, per-generator), clean only
    for row in section["results"]:
        for stat in [row["coverage"], *row["per_generator"].values()]:
            assert 0 <= stat["mean"] <= 1
        assert 0 <= row["set_size"]["mean"] <= 3
    for row in section["conditions"]:
        assert 0 <= row["ece_fixed"] <= 1 and 0 <= row["ece_fitted"] <= 1
    too_many = runner.invoke(cli, [*base, "--conformal", "0.95"])
    assert too_many.exit_code == 1
    assert "0.95 needs at least 19 calibration references" in too_many.output


def test_rsx_eval_rejects_an_unknown_method(toy_lab):
    result = CliRunner().invoke(cli, ["--lab", str(toy_lab), "eval", "--methods", "magic"])
    assert result.exit_code == 1 and "unknown method(s) magic" in result.output


@pytest.mark.slow
def test_rsx_eval_fusion_methods_and_families_end_to_end(tiny_eval_lab, tmp_path):
    """aeroblade, fused and fused-loo next to resynthesis, with families declared: the output
    has the new methods and the within/across breakdown, clean and post-processed."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    runner = CliRunner()
    out = tmp_path / "report"
    args = [
        "--lab", str(tiny_eval_lab), "eval", "--shots", "1", "--repeats", "2", "--generate",
        "--methods", "resynthesis,aeroblade,fused,fused-loo", "--families", "toy-a+toy-b",
        "--perturb", "jpeg", "--fusion-layers", "2", "--out", str(out),
    ]  # fmt: skip
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    for method in ("aeroblade", "fused", "fused-loo"):
        assert method in result.stdout
    assert "1-shot within" in result.stdout and "families: toy-a+toy-b" in result.stdout
    assert "look-alike goal at 1 shot" in result.stdout
    report = (out / "report.md").read_text()
    assert "### accuracy within and across families" in report
    summary = json.loads((out / "results.json").read_text())
    assert summary["fusion"]["signals"] == ["resynthesis", "layer-2", "reconstruction"]
    assert summary["fusion"]["unsupported"] == {}
    for cond in ("none", "jpeg"):
        entry = evaluation.result_for(summary, cond, "fused-loo", 1)
        assert set(entry["fusion_weights"][0]) == {"resynthesis", "layer-2", "reconstruction"}
        assert entry["families"]["queries"] == {"within": [6, 6], "across": [3, 3]}
    # the reconstruction of a toy's own image through its own autoencoder is the closest
    assert evaluation.result_for(summary, "none", "aeroblade", 1)["accuracy"]["mean"] == 1.0


@pytest.mark.slow
def test_rsx_eval_refuses_families_naming_unknown_generators(tiny_eval_lab):
    pytest.importorskip("sklearn")
    result = CliRunner().invoke(
        cli, ["--lab", str(tiny_eval_lab), "eval", "--shots", "1", "--families", "toy-a+toy-z"]
    )
    assert result.exit_code == 1
    assert "--families names generator(s) not evaluated: toy-z" in result.output
