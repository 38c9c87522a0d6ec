"""The evaluation protocol on synthetic features, and `rsx eval` end to end on a tiny toy lab."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from resynth_index.cli import cli
from resynth_index.evaluation import protocol as evaluation
from resynth_index.evaluation.data import EvalData
from resynth_index.evaluation.protocol import METHODS, EvalConfig, run_protocol


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
    assert keys == {(m, s) for m in METHODS for s in (1, 3)}
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
    for method in METHODS:
        assert method in result.stdout
    assert "1-shot" in result.stdout and "post-processed: jpeg" in result.stdout
    report = (out / "report.md").read_text()
    assert "accuracy_vs_shots.png" in report and "## Queries post-processed: grey" in report
    for name in ["results.json", "accuracy_vs_shots.png", "robustness.png", "confusion_hybrid.png"]:
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["queries"] == 12

    as_json = runner.invoke(cli, [*base, "--json", "--holdout-unknown", "1"])
    assert as_json.exit_code == 0, as_json.output
    summary = json.loads(as_json.stdout)
    assert summary["holdout_unknown"] == 1 and summary["generators"] == ["toy-a", "toy-b", "toy-c"]
    assert "open_set" in evaluation.result_for(summary, "none", "resynthesis", 2)


def test_rsx_eval_without_scikit_learn_says_how_to_install(toy_lab, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)
    result = CliRunner().invoke(cli, ["--lab", str(toy_lab), "eval", "--methods", "clip-svm"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'resynth-index[eval]'" in lines[0]


def test_rsx_eval_rejects_an_unknown_method(toy_lab):
    result = CliRunner().invoke(cli, ["--lab", str(toy_lab), "eval", "--methods", "magic"])
    assert result.exit_code == 1 and "unknown method(s) magic" in result.output
