"""Attribution end to end through the CLI, on a toy lab: caching, new generators, imported ones."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.cli import cli

pytestmark = pytest.mark.slow  # end to end through the CLI: not in the quick loop

CAPTION = "a lighthouse on a cliff at dusk"


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def query_json(lab: Path, *args: str) -> list[dict]:
    result = rsx(lab, "query", "--json", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


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


def test_a_new_generator_is_the_only_one_generated_for(toy_lab, make_toy_image):
    image = make_toy_image("toy-c", CAPTION)
    query_json(toy_lab, str(image), "--caption", CAPTION)
    assert rsx(toy_lab, "generator", "add", "toy-d", "--toy", "44").exit_code == 0
    [result] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert result["generated"] == 1
    assert result["reused"] == 3
    assert "toy-d" in result["candidates"]
    assert result["verdict"] == "toy-c"


def test_retired_generators_stop_being_candidates(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    assert rsx(toy_lab, "generator", "remove", "toy-b").exit_code == 0
    [result] = query_json(toy_lab, str(image), "--caption", CAPTION)
    assert result["candidates"] == ["toy-a", "toy-c"]
    listed = rsx(toy_lab, "generator", "list", "--all", "--json").output.splitlines()
    retired = [json.loads(line) for line in listed if json.loads(line)["retired_at"]]
    assert [r["name"] for r in retired] == ["toy-b"]


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


def test_no_generate_uses_only_what_is_stored(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    [result] = query_json(toy_lab, str(image), "--caption", CAPTION, "--no-generate")
    assert result["generated"] == 0
    assert result["ranking"] == []
    assert result["verdict"] == "no-evidence"
    assert result["not_generated"] == ["toy-a", "toy-b", "toy-c"]


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


def test_unknown_candidate_and_missing_caption_are_one_line_errors(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    result = rsx(toy_lab, "query", str(image), "--candidates", "nope")
    assert result.exit_code != 0 and "nope" in result.output
    assert "Traceback" not in result.output
    result = rsx(toy_lab, "query", str(image))  # no caption anywhere, no captioner
    assert result.exit_code != 0
    assert image.name in result.output and "caption" in result.output


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
