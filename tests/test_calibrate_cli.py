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
    from resynth_index.attribution.calibration.conformal import Calibration

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
    from resynth_index.attribution.calibration.sets import set_meaning

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
    assert _unused(answer) == (  # and how to use it
        "calibration #1 not used: calibrated on candidates imp-a, imp-b, imp-c;"
        " this candidate set adds imp-d; to use it, query with exactly its candidates"
        " (--candidates imp-a,imp-b,imp-c) or make them the lab's default ('rsx config set"
        " default_candidates imp-a,imp-b,imp-c'); or calibrate this set ('rsx calibrate')"
    )
    exactly = _query(reference_lab, suspect, CAPTIONS[0], "--candidates", "imp-c,imp-a,imp-b")
    assert exactly["calibration_id"] == 1  # the fix the note gives works
    made_default = _rsx(reference_lab, "config", "set", "default_candidates", "imp-a,imp-b,imp-c")
    assert made_default.exit_code == 0, made_default.output
    assert _query(reference_lab, suspect)["calibration_id"] == 1  # and so does the other
    assert _rsx(reference_lab, "config", "set", "default_candidates", "none").exit_code == 0
    assert _rsx(reference_lab, "generator", "remove", "imp-d").exit_code == 0
    assert _query(reference_lab, suspect)["calibration_id"] == 1  # the same candidates again
    assert _rsx(reference_lab, "generator", "remove", "imp-c").exit_code == 0
    note = _unused(_query(reference_lab, suspect))
    assert note.startswith("calibration #1 not used:") and "lacks imp-c; to use it, restore" in note
    assert "restore imp-c ('rsx generator restore NAME'), then query with exactly" in note
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
    assert _unused(fused) is None  # prediction sets are of resynthesis answers: no note at all
    fused_table = _rsx(
        reference_lab, "query", str(suspect), "--caption", CAPTIONS[0], "--method", "fused"
    )
    assert fused_table.exit_code == 0 and "calibration #1" not in fused_table.stdout
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


def test_missing_imported_resyntheses_are_named_and_become_work_orders(
    reference_lab: Path, tmp_path: Path
) -> None:
    """References whose caption lacks an imported candidate's resynthesis: the refusal says
    which, and how they come; their work orders are recorded for 'rsx export-prompts'."""
    rng = np.random.default_rng(5)
    lines = ["path,role,generator,caption"]
    for generator in GENERATORS:
        for i in range(3):  # 9 references of PARTIAL, which imp-c never made
            name = f"{generator}-partial-ref-{i}.png"
            _picture(_bases()[-1], generator, rng).save(tmp_path / name)
            lines.append(f"{name},reference,{generator},{PARTIAL}")
    (tmp_path / "more.csv").write_text("\n".join(lines) + "\n")
    assert _rsx(reference_lab, "ingest", str(tmp_path / "more.csv")).exit_code == 0

    refused = _rsx(reference_lab, "calibrate", "--coverage", "0.97")
    assert refused.exit_code == 1
    [line] = refused.output.strip().splitlines()
    assert line.endswith(
        "97 % coverage needs at least 33 usable references of the candidates; the lab has 24:"
        " 9 reference(s) left out, lacking a resynthesis of their caption by imported imp-c (9):"
        " deliver them ('rsx export-prompts' lists the work orders); or lower --coverage"
    )  # 24 + 9 would be enough: 'ingest more references' would be the wrong advice
    assert _stored(reference_lab)[0] == []
    orders = _rsx(reference_lab, "export-prompts")
    assert orders.exit_code == 0, orders.output
    [_header, order] = orders.stdout.strip().splitlines()
    assert order.startswith("imp-c,") and PARTIAL in order

    made = _rsx(reference_lab, "calibrate", "--coverage", "0.8")
    assert made.exit_code == 0, made.output
    assert "note: 9 reference(s) left out, lacking a resynthesis of their caption by" in made.stdout


def test_refusals_name_the_shortfall_and_whether_more_references_are_needed() -> None:
    """The words of a refusal for too few references, from what was left out and why."""
    from resynth_index.errors import RsxError
    from resynth_index.pipeline.plans import ResynthesisPlan
    from resynth_index.pipeline.references import ReferenceSet, check_enough, check_usable
    from resynth_index.store.calibrations import CalibrationReference
    from resynth_index.store.models import GeneratorRow

    rows = [
        GeneratorRow(id=1, name="mj", kind="imported"),
        GeneratorRow(id=2, name="sd", kind="toy"),
    ]
    found = ReferenceSet(
        generators=rows, references=[CalibrationReference(1, 10, 2, "c")],
        plan=ResynthesisPlan(), caption_texts={}, generate=False,
        lacking={"mj": 3, "sd": 12}, short_of={"imported": 3, "runnable": 12},
        left_out={"mj": 6, "sd": 7}, other_notes=["2 reference(s) without a caption left out"],
    )  # fmt: skip
    with pytest.raises(RsxError) as refused:
        check_enough(found, 0.95, per_generator=False)
    assert str(refused.value) == (
        "95 % coverage needs at least 19 usable references of the candidates; the lab has 1:"
        " 12 reference(s) left out, lacking resyntheses of their caption by sd (12): drop"
        " --no-generate to make them; 3 reference(s) left out, lacking a resynthesis of their"
        " caption by imported mj (3): deliver them ('rsx export-prompts' lists the work"
        " orders); ingest more references; or lower --coverage; 2 reference(s) without a"
        " caption left out"
    )  # 1 + 13 left out < 19: more references are needed whatever is made
    with pytest.raises(RsxError) as refused:
        check_enough(found, 0.9, per_generator=True)  # 9 each: sd 1 + 7, mj 0 + 6
    assert "mj has 0, sd has 1: 12 reference(s) left out" in str(refused.value)
    assert "; ingest more references; or lower --coverage" in str(refused.value)
    check_usable(found, "fused")  # one usable reference is enough to choose weights on
    found.references.clear()
    with pytest.raises(RsxError) as refused:
        check_usable(found, "fused")
    assert str(refused.value).startswith(
        "--method fused needs references of the candidates to choose its weights on, and the"
        " lab has no usable one: 12 reference(s) left out, lacking resyntheses"
    )


@pytest.fixture
def toy_references(toy_lab: Path, make_toy_image, tmp_path: Path) -> Path:
    """The toy lab with 6 references ingested (2 per toy generator, at seeds resyntheses never
    use) and no resynthesis stored."""
    lines = ["path,role,generator,caption"]
    for generator in ("toy-a", "toy-b", "toy-c"):
        for i, caption in enumerate(TOY_CAPTIONS):
            image = make_toy_image(generator, caption, seed=1000 + i)
            lines.append(f"{image.name},reference,{generator},{caption}")
    (tmp_path / "refs.csv").write_text("\n".join(lines) + "\n")
    ingested = _rsx(toy_lab, "ingest", str(tmp_path / "refs.csv"))
    assert ingested.exit_code == 0, ingested.output
    return toy_lab


TOY_CAPTIONS = ["a red bicycle", "a bowl of pears"]
TOY_PLAN = "planning 6 generations (3 generators x 1 resynthesis x 2 captions)"


def _resyntheses(lab: Path) -> int:
    from resynth_index.lab import Lab
    from resynth_index.store.stats import store_counts

    with Lab.open(lab) as opened, opened.session() as session:
        return store_counts(session, opened.fingerprint).resyntheses


@pytest.mark.slow
def test_calibrate_makes_the_missing_resyntheses_by_default(
    toy_references: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As 'rsx query' does; --no-generate refuses, naming what is missing and how it comes.
    On a terminal the generation shows on the status line, as it does for 'rsx query'."""
    import io

    from resynth_index.cli import calibrate as calibrate_command
    from resynth_index.cli.app import StatusLine

    shown: list[str] = []

    class Terminal(StatusLine):
        def __init__(self) -> None:
            super().__init__(io.StringIO())
            self.enabled = True

        def show(self, text: str) -> None:
            shown.append(text)

    monkeypatch.setattr(calibrate_command, "StatusLine", Terminal)
    missing = (
        "6 reference(s) left out, lacking resyntheses of their caption by toy-a (6), toy-b (6),"
        " toy-c (6): drop --no-generate to make them"
    )
    refused = _rsx(toy_references, "calibrate", "--coverage", "0.8", "--no-generate")
    assert refused.exit_code == 1
    [line] = refused.output.strip().splitlines()
    assert f"the lab has 0: {missing}; or lower --coverage" in line
    assert "ingest more references" not in line  # they are there: their resyntheses are not
    fused = _rsx(toy_references, "calibrate", "--method", "fused", "--no-generate")
    assert fused.exit_code == 1
    [line] = fused.output.strip().splitlines()
    assert line.endswith(f"the lab has no usable one: {missing}")
    assert _resyntheses(toy_references) == 0 and _stored(toy_references)[0] == []

    made = _rsx(toy_references, "calibrate", "--coverage", "0.8")
    assert made.exit_code == 0, made.output
    assert TOY_PLAN in made.stderr
    assert "references used: 6 (toy-a 2, toy-b 2, toy-c 2)" in made.stdout
    assert _resyntheses(toy_references) == 6
    assert {"toy-a: generating 0 of 2", "toy-c: generating 2 of 2"} <= set(shown)
    again = _rsx(toy_references, "calibrate", "--method", "fused", "--generate")  # still taken
    assert again.exit_code == 0, again.output
    assert "planning" not in again.stderr  # nothing left to make
    assert "references used: 6 (toy-a 2, toy-b 2, toy-c 2)" in again.stdout


@pytest.mark.slow
def test_more_generations_than_the_cap_need_yes(
    toy_references: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule of 'rsx query' (its GENERATION_CAP, lowered here): refused before anything is
    generated, unless --yes."""
    from resynth_index.cli import generation

    monkeypatch.setattr(generation, "GENERATION_CAP", 5)
    refused = _rsx(toy_references, "calibrate", "--coverage", "0.8")
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == [
        TOY_PLAN,
        "Error: 6 generations is more than the 5 a calibration makes without asking; pass --yes"
        " to go ahead, or --no-generate, or fewer --candidates",
    ]
    assert _resyntheses(toy_references) == 0 and _stored(toy_references)[0] == []
    made = _rsx(toy_references, "calibrate", "--coverage", "0.8", "--yes")
    assert made.exit_code == 0, made.output
    assert TOY_PLAN in made.stderr and _resyntheses(toy_references) == 6


@pytest.mark.slow
def test_ctrl_c_during_generation_says_what_was_kept(
    toy_references: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As 'rsx query': each batch is stored whole, the count is said, the exit status is 130."""
    from resynth_index.config import LabSettings
    from resynth_index.lab import Lab

    settings = LabSettings.load(toy_references)
    settings.generation_batch_size = 2  # one batch per toy generator (2 captions)
    settings.save(toy_references)
    with Lab.open(toy_references) as lab:
        model_class = type(lab.generator_model(lab.generators()[0]))
    real = model_class.generate
    calls: list[int] = []

    def generate_then_interrupt(self, requests, *args, **kwargs):
        calls.append(len(requests))
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(self, requests, *args, **kwargs)

    monkeypatch.setattr(model_class, "generate", generate_then_interrupt)
    interrupted = _rsx(toy_references, "calibrate", "--coverage", "0.8")
    assert interrupted.exit_code == 130 and calls == [2, 2]
    assert interrupted.stderr.splitlines()[-1] == (
        "interrupted: 2 resyntheses stored; rerun to continue"
    )
    assert _resyntheses(toy_references) == 2 and _stored(toy_references)[0] == []
    monkeypatch.setattr(model_class, "generate", real)
    rerun = _rsx(toy_references, "calibrate", "--coverage", "0.8")
    assert rerun.exit_code == 0, rerun.output
    assert "planning 4 generations (2 generators x 1 resynthesis x 2 captions" in rerun.stderr


def _calibrated_answer(**changes):
    """A closed-set answer over imp-a and imp-b, and a calibration of those two."""
    from resynth_index.attribution.answer import QueryResult, RankedGenerator
    from resynth_index.attribution.calibration.conformal import Calibration
    from resynth_index.attribution.calibration.sets import QueryCalibration

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
    from resynth_index.attribution.calibration.sets import apply

    choice, given = _calibrated_answer()
    answer = apply(choice, given)
    assert given.prediction_set is None and given.calibration_id is None  # a new answer
    # softmax(-d / 0.01): imp-a 0.731, imp-b 0.269; nonconformity 0.269 and 0.731 against 0.6
    assert answer.prediction_set == ["imp-a"] and answer.calibration_id == 7
    assert answer.ranking[0].score == pytest.approx(1 / (1 + np.exp(-1)))
    assert answer.verdict_reason == (
        "closest: imp-a at 0.1; prediction set: imp-a alone at 90 % coverage"
    )
    assert answer.score_meaning.endswith("calibrated on 3 references (calibration #7)")

    choice, partial = _calibrated_answer(not_generated=["imp-b"])
    partial = apply(choice, partial)
    assert partial.prediction_set is None and partial.ranking[0].score == 0.6
    assert partial.calibration_note is not None and "(--no-generate)" in partial.calibration_note
    assert apply(None, partial) is partial  # no calibration in the lab: nothing changes
