"""`rsx calibrate` and the calibrated answers of `rsx query`: the stored record, the refusals,
prediction sets in every rendering, and a calibration that no longer fits not being used.

The lab here is small and fast: the toy embedder and three imported generators whose
resyntheses and references are seeded noise images around one base picture per caption, tinted
slightly per generator (so attribution is right about 60 % of the time and sets vary in size).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from resynth_index.cli import cli
from resynth_index.config import DATABASE_FILE

GENERATORS = ("imp-a", "imp-b", "imp-c")
CAPTIONS = [f"a scene numbered {i}" for i in range(8)]  # 8 references per generator, 24 in all
PARTIAL = "a scene only two generators made"  # resyntheses by imp-a and imp-b, none by imp-c
TINT, NOISE = 5.0, 30.0


def _picture(base: np.ndarray, generator: str, rng: np.random.Generator) -> Image.Image:
    tint = np.zeros(3)
    tint[GENERATORS.index(generator)] = TINT
    pixels = np.clip(base + tint + rng.normal(0, NOISE, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _bases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(30, 200, (32, 32, 3)).astype(float) for _ in range(len(CAPTIONS) + 1)]


@pytest.fixture(scope="session")
def reference_lab_template(tmp_path_factory) -> Path:
    """A lab with three imported generators, one resynthesis per caption each, and 24
    references (built once; copy before use)."""
    root = tmp_path_factory.mktemp("calibration")
    lab = root / "lab"
    rng = np.random.default_rng(1)
    bases = _bases()
    lines = ["path,role,generator,caption,seed"]
    for i, caption in enumerate(CAPTIONS):
        for generator in GENERATORS:
            for role in ("resynthesis", "reference"):
                name = f"{generator}-{i}-{role}.png"
                _picture(bases[i], generator, rng).save(root / name)
                lines.append(
                    f"{name},{role},{generator},{caption},{0 if role != 'reference' else ''}"
                )
    for generator in GENERATORS[:2]:
        name = f"{generator}-partial.png"
        _picture(bases[-1], generator, rng).save(root / name)
        lines.append(f"{name},resynthesis,{generator},{PARTIAL},0")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    assert _rsx(lab, "init").exit_code == 0
    for generator in GENERATORS:
        assert _rsx(lab, "generator", "add", generator, "--imported").exit_code == 0
    ingested = _rsx(lab, "ingest", str(root / "manifest.csv"))
    assert ingested.exit_code == 0, ingested.output
    return lab


@pytest.fixture
def reference_lab(reference_lab_template: Path, tmp_path: Path) -> Path:
    target = tmp_path / "lab"
    shutil.copytree(reference_lab_template, target)
    return target


@pytest.fixture
def suspect(tmp_path: Path) -> Path:
    """A new image made like imp-a's images of the first caption."""
    path = tmp_path / "suspect.png"
    _picture(_bases()[0], "imp-a", np.random.default_rng(99)).save(path)
    return path


def _rsx(lab: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--lab", str(lab), *args])


def _query(lab: Path, image: Path, caption: str = CAPTIONS[0], *extra: str) -> dict:
    result = _rsx(lab, "query", str(image), "--caption", caption, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _stored(lab: Path):
    from resynth_index.lab import Lab
    from resynth_index.store import calibrations

    with Lab.open(lab) as opened, opened.session() as session:
        return calibrations.list_calibrations(session), opened.fingerprint, opened.generators()


# ----------------------------------------------------------------------------- rsx calibrate
def test_calibrate_stores_the_record_and_prints_a_summary(reference_lab: Path) -> None:
    from resynth_index.pipeline.conformal import Calibration

    printed = _rsx(reference_lab, "calibrate", "--coverage", "0.8")
    assert printed.exit_code == 0, printed.output
    text = printed.stdout
    assert "calibration #1 saved: resynthesis, 80 % coverage, one threshold" in text
    assert "references used: 24 (imp-a 8, imp-b 8, imp-c 8)" in text
    assert "threshold (1 - score of a candidate): " in text and "temperature: " in text
    assert "ECE on these references: " in text

    [saved], embedder, rows = _stored(reference_lab)
    assert (saved.id, saved.method, saved.coverage, saved.per_generator) == (
        1, "resynthesis", 0.8, False,
    )  # fmt: skip
    assert saved.candidates == GENERATORS and saved.active
    assert saved.embedder_fingerprint == embedder
    assert saved.settings == {"resyntheses": dict.fromkeys(GENERATORS, 1)}
    record = Calibration.from_dict(saved.record)
    assert record.reference_ids == tuple(range(1, 25))
    assert dict(record.generator_fingerprints) == {r.name: r.fingerprint for r in rows}
    assert (record.distance, record.aggregation) == ("cosine", "min")
    assert record.quantile is not None and 0 < record.quantile < 1 and not record.quantiles
    assert record.temperature > 0 and record.created_at
    assert dict(record.references_per_generator) == dict.fromkeys(GENERATORS, 8)
    assert 0 <= saved.summary["ece_fitted"] <= saved.summary["ece_fixed"] <= 1


def test_a_new_calibration_supersedes_the_old_one_which_stays(reference_lab: Path) -> None:
    assert _rsx(reference_lab, "calibrate", "--coverage", "0.8").exit_code == 0
    again = _rsx(reference_lab, "calibrate", "--coverage", "0.75", "--per-generator", "--json")
    assert again.exit_code == 0, again.output
    printed = json.loads(again.stdout)
    assert printed["calibration_id"] == 2 and printed["superseded"] == [1]
    assert set(printed["calibration"]["quantiles"]) == set(GENERATORS)
    newest, oldest = _stored(reference_lab)[0]
    assert (newest.id, newest.active, newest.per_generator) == (2, True, True)
    assert (oldest.id, oldest.superseded_by, oldest.coverage) == (1, 2, 0.8)


def test_too_few_references_are_refused_naming_how_many_and_nothing_is_saved(
    reference_lab: Path,
) -> None:
    refused = _rsx(reference_lab, "calibrate", "--coverage", "0.97")
    assert refused.exit_code == 1
    [line] = refused.output.strip().splitlines()
    assert "97 % coverage needs at least 33 usable references" in line and "has 24" in line
    per_group = _rsx(reference_lab, "calibrate", "--coverage", "0.9", "--per-generator")
    assert per_group.exit_code == 1
    [line] = per_group.output.strip().splitlines()
    assert "needs at least 9 usable references of each candidate" in line
    assert "imp-a has 8, imp-b has 8, imp-c has 8" in line
    assert _stored(reference_lab)[0] == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--method", "fused"], "--coverage does not apply to --method fused"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--candidates", "imp-a"], "at least two candidates"),
        (["--candidates", "imp-a,nobody"], "unknown or retired generator(s): nobody"),
    ],
)
def test_what_cannot_be_calibrated_is_refused_in_one_line(
    reference_lab: Path, args: list[str], words: str
) -> None:
    refused = _rsx(reference_lab, "calibrate", "--coverage", "0.8", *args)
    assert refused.exit_code == 1
    [line] = refused.output.strip().splitlines()
    assert words in line
    assert _stored(reference_lab)[0] == []


# ----------------------------------------------------------------------------- calibrated answers
def test_without_a_calibration_answers_are_as_before(reference_lab: Path, suspect: Path) -> None:
    answer = _query(reference_lab, suspect)
    for key in ("prediction_set", "coverage", "calibration_id", "calibration_note"):
        assert answer[key] is None
    assert answer["temperature"] == 0.05
    assert answer["verdict_reason"].endswith(
        "closed set: the source may be none of these candidates"
    )


def test_answers_gain_a_prediction_set_everywhere(
    reference_lab: Path, suspect: Path, tmp_path: Path
) -> None:
    from resynth_index.lab import Lab
    from resynth_index.store import audit

    assert _rsx(reference_lab, "calibrate", "--coverage", "0.8").exit_code == 0
    [saved], _, _ = _stored(reference_lab)
    temperature = saved.record["temperature"]
    answer = _query(reference_lab, suspect)
    assert answer["calibration_id"] == 1 and answer["coverage"] == 0.8
    assert answer["calibration_note"] is None
    assert set(answer["prediction_set"]) <= set(GENERATORS)
    assert answer["temperature"] == temperature
    assert "calibrated on 24 references (calibration #1)" in answer["score_meaning"]
    distances = np.array([entry["distance"] for entry in answer["ranking"]])
    expected = np.exp(-(distances - distances.min()) / temperature)
    scores = [entry["score"] for entry in answer["ranking"]]
    assert np.allclose(scores, expected / expected.sum())
    assert "closed set" not in answer["verdict_reason"]
    # the set is the candidates whose nonconformity 1 - score passes the threshold
    chosen = [
        e["generator"] for e in answer["ranking"] if 1 - e["score"] <= saved.record["quantile"]
    ]
    assert answer["prediction_set"] == chosen

    with Lab.open(reference_lab) as lab, lab.session() as session:
        stored = json.loads(audit.recorded_answer(session, answer["query_id"]) or "{}")
    assert stored["prediction_set"] == answer["prediction_set"]
    assert stored["calibration_id"] == 1 and stored["coverage"] == 0.8

    report = tmp_path / "answer.html"
    table = _rsx(
        reference_lab, "query", str(suspect), "--caption", CAPTIONS[0], "--report", str(report)
    )
    assert table.exit_code == 0, table.output
    assert "prediction set at 80 % (calibration #1): " in table.stdout
    assert "closed set" not in table.stdout
    assert "calibrated on 24 references (calibration #1)" in table.stdout
    page = report.read_text()
    assert "prediction set at 80 %" in page and "(calibration #1)" in page


def test_what_a_set_says() -> None:
    from resynth_index.pipeline.calibrated import set_meaning

    assert set_meaning([], 0.95) == "none of the candidates at 95 % coverage (open-set answer)"
    assert set_meaning(["a"], 0.9) == "a alone at 90 % coverage"
    assert set_meaning(["a", "b"], 0.95) == "one of: a, b — cannot narrow further at 95 %"


def _unused(answer: dict) -> str:
    assert answer["prediction_set"] is None and answer["calibration_id"] is None
    assert answer["coverage"] is None and answer["temperature"] == 0.05
    return answer["calibration_note"]


def test_a_new_or_retired_candidate_leaves_the_calibration_unused_and_says_why(
    reference_lab: Path, suspect: Path
) -> None:
    assert _rsx(reference_lab, "calibrate", "--coverage", "0.8").exit_code == 0
    assert _rsx(reference_lab, "generator", "add", "imp-d", "--imported").exit_code == 0
    answer = _query(reference_lab, suspect, CAPTIONS[0])
    assert _unused(answer) == (
        "calibration #1 not used: calibrated on candidates imp-a, imp-b, imp-c;"
        " this candidate set adds imp-d"
    )
    assert _rsx(reference_lab, "generator", "remove", "imp-d").exit_code == 0
    assert _query(reference_lab, suspect)["calibration_id"] == 1  # the same candidates again
    assert _rsx(reference_lab, "generator", "remove", "imp-c").exit_code == 0
    note = _unused(_query(reference_lab, suspect))
    assert note.startswith("calibration #1 not used:") and note.endswith("lacks imp-c")
    table = _rsx(reference_lab, "query", str(suspect), "--caption", CAPTIONS[0])
    assert note in table.stdout and "closed set: the source may be none" in table.stdout


def test_changed_models_settings_or_missing_resyntheses_leave_it_unused(
    reference_lab: Path, suspect: Path
) -> None:
    assert _rsx(reference_lab, "calibrate", "--coverage", "0.8").exit_code == 0
    pending = _query(reference_lab, suspect, PARTIAL)
    assert pending["pending"] == ["imp-c"]
    assert _unused(pending) == (
        "calibration #1 not used: no resynthesis of this caption by imp-c, so the set cannot"
        " be computed"
    )
    fused = _query(reference_lab, suspect, CAPTIONS[0], "--method", "fused")
    assert _unused(fused) == "calibration #1 not used: calibrated for resynthesis, not fused"
    assert _rsx(reference_lab, "generator", "set", "imp-a", "--resyntheses", "2").exit_code == 0
    assert "imp-a 1 (now 2)" in _unused(_query(reference_lab, suspect))
    assert _rsx(reference_lab, "generator", "set", "imp-a", "--resyntheses", "1").exit_code == 0
    assert _query(reference_lab, suspect)["calibration_id"] == 1
    with sqlite3.connect(reference_lab / DATABASE_FILE) as connection:  # as if re-registered
        connection.execute(
            "UPDATE generators SET fingerprint = ? WHERE name = 'imp-b'", ("f" * 64,)
        )
    assert _unused(_query(reference_lab, suspect)) == (
        "calibration #1 not used: generator(s) changed since calibration: imp-b"
    )


@pytest.mark.slow
def test_calibrate_generates_missing_resyntheses_of_runnable_candidates(toy_lab: Path) -> None:
    """Toy generators: references at seeds resyntheses never use; --generate makes the rest."""
    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import GenerationRequest

    captions = ["a red bicycle", "a bowl of pears"]
    folder = toy_lab.parent / "refs"
    folder.mkdir()
    lines = ["path,role,generator,caption"]
    with Lab.open(toy_lab) as lab:
        for row in lab.generators():
            model = lab.generator_model(row)
            images = model.generate(
                [GenerationRequest(c, 1000 + i) for i, c in enumerate(captions)]
            )
            for i, image in enumerate(images):
                image.save(folder / f"{row.name}-{i}.png")
                lines.append(f"{row.name}-{i}.png,reference,{row.name},{captions[i]}")
    (folder / "refs.csv").write_text("\n".join(lines) + "\n")
    assert _rsx(toy_lab, "ingest", str(folder / "refs.csv")).exit_code == 0
    without = _rsx(toy_lab, "calibrate", "--coverage", "0.8")
    assert without.exit_code == 1 and "the lab has 0" in without.output
    assert "6 reference(s) left out: their caption lacks resyntheses by toy-a (6)" in without.output
    made = _rsx(toy_lab, "calibrate", "--coverage", "0.8", "--generate")
    assert made.exit_code == 0, made.output
    assert "references used: 6 (toy-a 2, toy-b 2, toy-c 2)" in made.stdout


def _calibrated_answer(**changes):
    """A closed-set answer over imp-a and imp-b, and a calibration of those two."""
    from resynth_index.pipeline.calibrated import QueryCalibration
    from resynth_index.pipeline.conformal import Calibration
    from resynth_index.pipeline.query import QueryResult, RankedGenerator

    calibration = Calibration(
        method="resynthesis", coverage=0.9, per_generator=False, quantile=0.6, quantiles={},
        temperature=0.01, reference_ids=(1, 2, 3), embedder_fingerprint="e" * 64,
        generator_fingerprints={"imp-a": "a" * 64, "imp-b": "b" * 64}, distance="cosine",
        aggregation="min", created_at="2026-01-01T00:00:00+00:00",
    )  # fmt: skip
    ranking = [
        RankedGenerator("imp-a", 0.10, 0.6, [0.10], "1" * 64),
        RankedGenerator("imp-b", 0.11, 0.4, [0.11], "2" * 64),
    ]
    values = dict(
        image="x.png", sha256="0" * 64, caption="c", caption_source="explicit", verdict="imp-a",
        ranking=ranking, margin=0.01, generated=0, reused=2, pending=[], not_generated=[],
        candidates=["imp-a", "imp-b"], distance="cosine", aggregation="min", fingerprints={},
        verdict_reason="closest: imp-a at 0.1; closed set: the source may be none of these"
        " candidates",
    )  # fmt: skip
    values.update(changes)
    return QueryCalibration(7, calibration, references=3), QueryResult(**values)


def test_applying_a_calibration_to_one_answer() -> None:
    from resynth_index.pipeline.calibrated import apply

    choice, answer = _calibrated_answer()
    apply(choice, answer)
    # softmax(-d / 0.01): imp-a 0.731, imp-b 0.269; nonconformity 0.269 and 0.731 against 0.6
    assert answer.prediction_set == ["imp-a"] and answer.calibration_id == 7
    assert answer.ranking[0].score == pytest.approx(1 / (1 + np.exp(-1)))
    assert answer.verdict_reason == (
        "closest: imp-a at 0.1; prediction set: imp-a alone at 90 % coverage"
    )
    assert answer.score_meaning.endswith("calibrated on 3 references (calibration #7)")

    choice, partial = _calibrated_answer(not_generated=["imp-b"])
    apply(choice, partial)
    assert partial.prediction_set is None and partial.ranking[0].score == 0.6
    assert partial.calibration_note is not None and "(--no-generate)" in partial.calibration_note
    apply(None, partial)  # no calibration in the lab: nothing changes
    assert partial.calibration_id is None
