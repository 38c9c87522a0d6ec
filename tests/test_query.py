"""Attribution end to end through the CLI, on a toy lab: caching, new generators, imported ones."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.attribution.answer import QueryResult, RankedGenerator
from resynth_index.cli import cli
from resynth_index.errors import RsxError

slow = pytest.mark.slow  # end to end through the CLI: not in the quick loop

CAPTION = "a lighthouse on a cliff at dusk"


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def query_json(lab: Path, *args: str) -> list[dict]:
    result = rsx(lab, "query", "--json", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@slow
def test_query_names_the_source_and_second_query_generates_nothing(toy_lab, make_toy_image):
    image = make_toy_image("toy-b", CAPTION)
    [first] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert first["verdict"] == "toy-b"
    assert first["caption_source"] == "explicit"
    assert first["generated"] == 3 and first["reused"] == 0
    assert [r["generator"] for r in first["ranking"]][0] == "toy-b"
    assert {"image", "sha256", "caption", "ranking", "pending"} <= set(first)
    assert abs(sum(r["score"] for r in first["ranking"]) - 1.0) < 1e-6

    [again] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert again["generated"] == 0 and again["reused"] == 3
    assert again["ranking"] == first["ranking"]

    other = make_toy_image("toy-a", CAPTION, seed=2000)
    [second] = query_json(toy_lab, str(other), "--caption", CAPTION)
    assert second["generated"] == 0
    assert second["verdict"] == "toy-a"


@slow
def test_a_new_generator_is_the_only_one_generated_for(toy_lab, make_toy_image):
    image = make_toy_image("toy-c", CAPTION)
    query_json(toy_lab, str(image), "--caption", CAPTION)
    assert rsx(toy_lab, "generator", "add", "toy-d", "--toy", "44").exit_code == 0
    [result] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert result["generated"] == 1
    assert result["reused"] == 3
    assert "toy-d" in result["candidates"]
    assert result["verdict"] == "toy-c"


@slow
def test_retired_generators_stop_being_candidates(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    assert rsx(toy_lab, "generator", "remove", "toy-b").exit_code == 0
    [result] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert result["candidates"] == ["toy-a", "toy-c"]
    listed = rsx(toy_lab, "generator", "list", "--all", "--json").output.splitlines()
    retired = [json.loads(line) for line in listed if json.loads(line)["retired_at"]]
    assert [r["name"] for r in retired] == ["toy-b"]


@slow
def test_imported_generator_is_pending_then_completed_by_ingest(toy_lab, make_toy_image, tmp_path):
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    image = make_toy_image("toy-a", CAPTION)
    [result] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert result["pending"] == ["mj"]
    assert "mj" not in [r["generator"] for r in result["ranking"]]

    orders = tmp_path / "orders.csv"
    assert rsx(toy_lab, "export-prompts", "--generator", "mj", "--out", str(orders)).exit_code == 0
    rows = list(csv.DictReader(orders.open()))
    assert [(r["generator"], r["caption"]) for r in rows] == [("mj", CAPTION)]

    # the 'service' delivers its image: here, the toy-a image itself stands in for it
    delivered = make_toy_image("toy-b", CAPTION, seed=4242, name="mj-made.png")
    rows[0]["path"] = delivered.name
    manifest = tmp_path / "delivered.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ingested = rsx(toy_lab, "ingest", str(manifest))
    assert ingested.exit_code == 0, ingested.output
    assert "1 added" in ingested.output

    [done] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert done["pending"] == []
    assert "mj" in [r["generator"] for r in done["ranking"]]
    assert done["generated"] == 0
    again = rsx(toy_lab, "export-prompts", "--generator", "mj")
    assert CAPTION not in again.output


@slow
def test_no_generate_uses_only_what_is_stored(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    ran = rsx(toy_lab, "query", "--json", str(image), "--caption", CAPTION, "--no-generate")
    assert ran.exit_code == 1  # no evidence is no answer: a script must not take it for one
    [result] = [json.loads(line) for line in ran.stdout.splitlines()]
    assert result["generated"] == 0
    assert result["ranking"] == []
    assert result["verdict"] == "no-evidence"
    assert result["not_generated"] == ["toy-a", "toy-b", "toy-c"]
    assert result["without_resynthesis"] == ["toy-a", "toy-b", "toy-c"]
    assert "toy-a, toy-b, toy-c" in result["verdict_reason"]
    assert f"no evidence: {image}: no resynthesis of its caption by toy-a, toy-b, toy-c" in (
        ran.stderr
    )
    table = rsx(toy_lab, "query", str(image), "--caption", CAPTION, "--no-generate")
    assert table.exit_code == 1
    assert "no evidence: no resynthesis of this caption by toy-a, toy-b, toy-c" in table.stdout


@slow
def test_caption_from_png_metadata_and_a_report(toy_lab, make_toy_image, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    source = make_toy_image("toy-b", CAPTION)
    info = PngInfo()
    info.add_text("parameters", f"{CAPTION}\nNegative prompt: blurry\nSteps: 4, Model: toy-b")
    tagged = tmp_path / "tagged <x>.png"
    Image.open(source).save(tagged, pnginfo=info)
    report = tmp_path / "report.html"
    [result] = query_json(toy_lab, str(tagged), "--report", str(report))
    assert result["caption"] == CAPTION
    assert result["caption_source"].startswith("metadata:")
    assert result["verdict"] == "toy-b"
    html = report.read_text()
    assert html.count("data:image/png;base64,") == 1 + len(result["ranking"])
    assert "tagged &lt;x&gt;.png" in html and "<x>" not in html


@slow
def test_unknown_candidate_and_missing_caption_are_one_line_errors(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    result = rsx(toy_lab, "query", str(image), "--candidates", "nope")
    assert result.exit_code != 0 and "nope" in result.output
    assert "Traceback" not in result.output
    result = rsx(toy_lab, "query", str(image))  # no caption anywhere, no captioner
    assert result.exit_code != 0
    assert image.name in result.output and "caption" in result.output


@slow
def test_audit_record_holds_every_distance(toy_lab, make_toy_image):
    from sqlalchemy import select

    from resynth_index.lab import Lab
    from resynth_index.store.models import QueryRow

    image = make_toy_image("toy-a", CAPTION)
    [result] = query_json(toy_lab, str(image), "--caption", CAPTION)
    with Lab.open(toy_lab) as lab, lab.session() as session:
        row = session.scalar(select(QueryRow))
        assert row.verdict == result["verdict"] == "toy-a"
        assert row.image_sha256 == result["sha256"]
        distances = json.loads(row.distances_json)
        assert set(distances) == {"toy-a", "toy-b", "toy-c"}
        assert json.loads(row.fingerprints_json)["embedder"] == lab.fingerprint


@slow
def test_stored_answer_is_the_json_answer_with_its_query_id(toy_lab, make_toy_image):
    from sqlalchemy import select

    from resynth_index.lab import Lab
    from resynth_index.store.models import QueryRow

    images = [make_toy_image(g, CAPTION) for g in ("toy-a", "toy-c")]
    answers = query_json(toy_lab, *map(str, images), "--caption", CAPTION)
    with Lab.open(toy_lab) as lab, lab.session() as session:
        rows = {row.id: json.loads(row.result_json) for row in session.scalars(select(QueryRow))}
    assert sorted(rows) == sorted(answer["query_id"] for answer in answers)
    for answer in answers:
        assert isinstance(answer["query_id"], int)
        assert rows[answer["query_id"]] == answer


@slow
def test_an_answer_holds_what_reproduces_it_in_json_and_in_its_audit_row(toy_lab, make_toy_image):
    from sqlalchemy import select

    from resynth_index import __version__
    from resynth_index.lab import Lab
    from resynth_index.store.models import QueryRow

    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    image = make_toy_image("toy-b", CAPTION)
    [answer] = query_json(toy_lab, str(image), "--caption", CAPTION, "--resyntheses", "2")
    with Lab.open(toy_lab) as lab, lab.session() as session:
        [stored] = [json.loads(row.result_json) for row in session.scalars(select(QueryRow))]
    assert stored == answer
    assert answer["rsx_version"] == __version__
    assert answer["resyntheses_per_generator"] == {"toy-a": 2, "toy-b": 2, "toy-c": 2, "mj": 2}
    made = dict(answer["generation"]["toy-b"])
    assert made.pop("source").endswith("toy-b")  # the model folder, as the lab registered it
    assert made == {
        "kind": "toy",
        "imported": False,
        "steps": made["steps"],
        "guidance": made["guidance"],
        "size": made["size"],
        "scheduler": None,
        "negative_prompt": None,
        "dtype": "float32",  # 'auto' resolved on this CPU
        "seeds": [0, 1],
    }
    assert isinstance(made["steps"], int) and isinstance(made["guidance"], float)
    assert answer["generation"]["mj"] == {"kind": "imported", "imported": True}
    assert answer["score_meaning"] == "relative among candidates (softmax of -distance/0.05)"
    assert answer["threshold"] is None and answer["closed_set"] is True
    assert answer["margin_floor"] == 0.002 and answer["verdict_reason"].startswith("closest: toy-b")


@slow
def test_identical_generators_make_an_inconclusive_answer_naming_both(toy_lab, make_toy_image):
    # 'twin' is toy-a's seed: it resynthesises exactly as toy-a does, so the margin is 0
    assert rsx(toy_lab, "generator", "add", "twin", "--toy", "11").exit_code == 0
    image = make_toy_image("toy-a", CAPTION)
    [answer] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert answer["verdict"] == "inconclusive"
    assert answer["margin"] == 0.0
    assert answer["tied"] == ["toy-a", "twin"]
    assert "toy-a and twin" in answer["verdict_reason"]
    table = rsx(toy_lab, "query", str(image), "--caption", CAPTION)
    assert table.exit_code == 0
    assert "verdict: inconclusive" in table.stdout and "toy-a and twin" in table.stdout


@slow
def test_a_threshold_set_later_makes_unknown_with_its_reason_and_ends_the_closed_set_note(
    toy_lab, make_toy_image, tmp_path
):
    from resynth_index.attribution.answer import CLOSED_SET_NOTE
    from resynth_index.lab import Lab
    from resynth_index.store.models import QueryRow

    image = make_toy_image("toy-c", CAPTION)
    closed = rsx(toy_lab, "query", str(image), "--caption", CAPTION)
    assert closed.exit_code == 0
    assert CLOSED_SET_NOTE in closed.stdout and "threshold none" in closed.stdout
    assert "  query 1" in closed.stdout.splitlines()[0]  # the audit record's id, to look it up

    assert rsx(toy_lab, "config", "set", "threshold", "0.000001").exit_code == 0
    report = tmp_path / "answer.html"
    [answer] = query_json(toy_lab, str(image), "--caption", CAPTION, "--report", str(report))
    assert answer["verdict"] == "unknown"
    assert answer["threshold"] == 0.000001 and answer["closed_set"] is False
    assert answer["verdict_reason"].startswith("beyond threshold 1e-06: best toy-c at")
    with Lab.open(toy_lab) as lab, lab.session() as session:
        row = session.get(QueryRow, answer["query_id"])
        stored = json.loads(row.result_json)
    assert stored["threshold"] == 0.000001 and stored["verdict_reason"] == answer["verdict_reason"]
    html = report.read_text()
    assert "threshold\n1e-06" in html and "beyond threshold 1e-06" in html
    assert CLOSED_SET_NOTE not in html
    table = rsx(toy_lab, "query", str(image), "--caption", CAPTION)
    assert "verdict: unknown" in table.stdout and "why: beyond threshold 1e-06" in table.stdout
    assert CLOSED_SET_NOTE not in table.stdout and "threshold 1e-06" in table.stdout


@slow
def test_default_candidates_set_in_the_lab_are_the_ones_asked(toy_lab, make_toy_image):
    assert rsx(toy_lab, "config", "set", "default_candidates", "toy-b,toy-c").exit_code == 0
    image = make_toy_image("toy-b", CAPTION)
    [answer] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert answer["candidates"] == ["toy-b", "toy-c"]
    [given] = query_json(toy_lab, str(image), "--caption", CAPTION, "--candidates", "toy-a")
    assert given["candidates"] == ["toy-a"]  # --candidates still wins
    assert rsx(toy_lab, "generator", "remove", "toy-c").exit_code == 0
    refused = rsx(toy_lab, "query", str(image), "--caption", CAPTION)
    assert refused.exit_code == 1
    assert "default candidates name retired or unknown generator(s): toy-c" in refused.output


@slow
def test_a_query_that_is_itself_a_stored_resynthesis_is_flagged(toy_lab, make_toy_image, tmp_path):
    from resynth_index.lab import Lab

    image = make_toy_image("toy-a", CAPTION)
    [first] = query_json(toy_lab, str(image), "--caption", CAPTION)
    by_c = next(r for r in first["ranking"] if r["generator"] == "toy-c")
    copy = tmp_path / "copy-of-a-resynthesis.png"
    with Lab.open(toy_lab) as lab:
        copy.write_bytes(lab.blobs.read(by_c["nearest_sha256"]))
    [answer] = query_json(toy_lab, str(copy), "--caption", CAPTION)
    assert answer["sha256"] == by_c["nearest_sha256"]
    assert answer["exact_match_of"] == ["toy-c"]
    assert answer["ranking"][0]["distance"] < 1e-6
    [other] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert other["exact_match_of"] == []
    table = rsx(toy_lab, "query", str(copy), "--caption", CAPTION).stdout
    assert (
        "WARNING: this image is itself a stored resynthesis by toy-c: a distance of 0 says"
        " nothing about its origin"
    ) in table


# ------------------------------------------------------------------ answers read back (from_json)
def _answer(**changes) -> QueryResult:
    """An answer built by hand, with every field set to something other than its default."""
    values = dict(
        image="suspect.png",
        sha256="ab" * 32,
        caption=CAPTION,
        caption_source="explicit",
        verdict="inconclusive",
        ranking=[
            RankedGenerator("toy-a", 0.01, 0.6, [0.01, 0.02], "cd" * 32),
            RankedGenerator("toy-b", 0.0101, 0.4, [0.0101], "ef" * 32),
        ],
        margin=0.0001,
        generated=2,
        reused=1,
        pending=["mj"],
        not_generated=[],
        candidates=["toy-a", "toy-b", "mj"],
        distance="cosine",
        aggregation="min",
        fingerprints={"embedder": "e" * 64, "toy-a": "a" * 64},
        metadata={"parameters": "x"},
        query_id=7,
        verdict_reason="toy-a and toy-b lie within the margin floor",
        tied=["toy-a", "toy-b"],
        threshold=0.5,
        margin_floor=0.002,
        closed_set=False,
        without_resynthesis=["mj"],
        exact_match_of=["toy-b"],
        score_meaning="relative among candidates (softmax of -distance/0.1)",
        temperature=0.1,
        rsx_version="9.9",
        resyntheses_per_generator={"toy-a": 2, "toy-b": 1, "mj": 1},
        generation={"toy-a": {"kind": "toy", "steps": 4, "seeds": [0, 1]}},
    )
    values.update(changes)
    return QueryResult(**values)


def test_an_answer_reads_back_from_its_json() -> None:
    answer = _answer()
    stored = json.loads(json.dumps(answer.to_json()))  # through text, as an audit row keeps it
    again = QueryResult.from_json(stored)
    assert again == answer
    assert again.to_json() == answer.to_json()
    again.ranking[0].distances.append(1.0)  # nothing is shared with the dict it came from
    assert stored["ranking"][0]["distances"] == [0.01, 0.02]


def test_an_answer_stored_before_the_newer_fields_reads_with_defaults() -> None:
    old = _answer(verdict="toy-a").to_json()
    for key in (
        "verdict_reason", "tied", "threshold", "margin_floor", "closed_set", "without_resynthesis",
        "exact_match_of", "score_meaning", "temperature", "rsx_version",
        "resyntheses_per_generator", "generation",
    ):  # fmt: skip
        del old[key]
    read = QueryResult.from_json(old)
    assert read.verdict == "toy-a" and read.query_id == 7
    assert read.threshold is None and read.closed_set is True
    assert read.tied == [] and read.exact_match_of == [] and read.rsx_version == ""
    assert read.margin_floor == 0.0 and read.generation == {}
    assert read.ranking[1].generator == "toy-b"
    newer = {**_answer().to_json(), "a_field_from_the_future": 1}
    assert QueryResult.from_json(newer) == _answer()


def test_what_is_not_an_answer_is_refused_in_one_line() -> None:
    with pytest.raises(RsxError, match="lacks sha256, verdict"):
        QueryResult.from_json({"image": "x.png"})
    with pytest.raises(RsxError, match="JSON object"):
        QueryResult.from_json([1, 2])  # type: ignore[arg-type]
    with pytest.raises(RsxError, match="ranking entry"):
        QueryResult.from_json({"image": "x", "sha256": "y", "verdict": "a", "ranking": [{}]})


# ------------------------------------------------------------------ the terminal table
def test_the_table_labels_scores_as_relative_and_shows_the_query_id() -> None:
    from resynth_index.attribution.answer import CLOSED_SET_NOTE
    from resynth_index.cli.render import render_answer

    table = render_answer(_answer())
    lines = table.splitlines()
    assert lines[0].endswith("query 7")
    header = next(line for line in lines if "generator" in line and "distance" in line)
    assert "rel.score" in header and " score" not in header.replace("rel.score", "")
    assert "  rel.score: relative score among these candidates, not a probability" in lines
    assert "why: toy-a and toy-b lie within the margin floor" in table
    assert "threshold 0.5; margin floor 0.002" in table
    assert CLOSED_SET_NOTE not in table  # a threshold applies
    assert "WARNING: this image is itself a stored resynthesis by toy-b" in table
    assert "made by toy-a (K 2): 4 steps" in table and "seeds 0,1" in table
    assert "rsx 9.9" in table

    closed = render_answer(_answer(threshold=None, closed_set=True, exact_match_of=[]))
    assert f"  {CLOSED_SET_NOTE}" in closed.splitlines()
    assert "WARNING" not in closed


def test_the_table_of_an_answer_without_evidence_says_what_was_missing() -> None:
    from resynth_index.cli.render import render_answer

    table = render_answer(
        _answer(verdict="no-evidence", ranking=[], margin=None, without_resynthesis=["a", "mj"])
    )
    assert "no evidence: no resynthesis of this caption by a, mj" in table
    assert "rel.score" not in table  # no ranking, no score column


def test_the_table_shows_the_files_own_metadata_as_evidence() -> None:
    from resynth_index.cli.render import evidence_line

    metadata = {
        "exif:Model": "sdxl_base",
        "exif:Software": "Adobe Photoshop 25.0 (Windows)",
        "png:parameters": "a lighthouse at dusk, golden hour, " * 5,
        "xmp:description": "x",
        "xmp:creator": "y",
    }
    line = evidence_line(metadata)
    assert line is not None and line.startswith("evidence in the file (not trusted): ")
    assert "exif:Model: sdxl_base" in line and "exif:Software: Adobe Photoshop" in line
    assert "(+1 more in --json)" in line
    assert "golden hour, a lighthouse at dusk, golden hour, a" not in line  # long values cut
    assert evidence_line({}) is None
