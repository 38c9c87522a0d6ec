"""`rsx history`, `rsx show` and `rsx info`: the audit trail and the lab, from the command line.

Most tests record answers straight through ``store/audit.py`` (no model runs, so they are quick);
one slow test goes through a real ``rsx query`` and checks that ``rsx show`` gives back what it
printed, byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.attribution.answer import QueryResult
from resynth_index.cli import cli
from resynth_index.cli.render import render_answer
from resynth_index.hashing import hash_bytes, hash_file
from resynth_index.lab import Lab
from resynth_index.store import audit, migrate, repository

pytestmark = pytest.mark.slow  # builds a toy lab with queries for the module (about 7 s)

CAPTION = "a lighthouse on a cliff at dusk"


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def record(
    lab_dir: Path,
    *,
    image: str,
    caption: str,
    verdict: str = "toy-a",
    sha256: str | None = None,
) -> int:
    """Record one answer in the audit as a query would, without running one; its query id."""
    sha256 = sha256 or hash_bytes(image.encode())
    answer = QueryResult.from_json(
        {
            "image": image,
            "sha256": sha256,
            "caption": caption,
            "caption_source": "explicit",
            "verdict": verdict,
            "ranking": [
                {
                    "generator": "toy-a",
                    "distance": 0.125,
                    "score": 0.75,
                    "distances": [0.125, 0.25],
                    "nearest_sha256": hash_bytes(b"nearest toy-a"),
                },
                {
                    "generator": "toy-b",
                    "distance": 0.5,
                    "score": 0.25,
                    "distances": [0.5],
                    "nearest_sha256": hash_bytes(b"nearest toy-b"),
                },
            ],
            "margin": 0.375,
            "candidates": ["toy-a", "toy-b"],
            "fingerprints": {"embedder": "e" * 64, "toy-a": "a" * 64, "toy-b": "b" * 64},
        }
    ).to_json()
    caption_hash = hash_bytes(caption.encode())
    with Lab.open(lab_dir) as lab, lab.session() as session:
        repository.ensure_caption(session, caption_hash, caption)
        return audit.record_query(
            session,
            answer=answer,
            caption_hash=caption_hash,
            distances={"toy-a": [0.125, 0.25], "toy-b": [0.5]},
        )


@pytest.fixture
def audited(toy_lab: Path) -> dict[str, int]:
    """Five recorded answers: image name -> query id, in the order they were recorded."""
    answers = [
        ("one.png", "a red barn in snow", "toy-a"),
        ("two.png", CAPTION, "toy-b"),
        ("three.png", "A LIGHTHOUSE in fog, " + "very " * 20 + "long", "unknown"),
        ("one.png", "a red barn in snow", "toy-a"),
        ("four.png", "50% off: a_sale sign", "toy-a"),
    ]
    ids = {}
    for position, (image, caption, verdict) in enumerate(answers):
        ids[f"{image}#{position}"] = record(toy_lab, image=image, caption=caption, verdict=verdict)
    return ids


def history_json(lab: Path, *args: str) -> list[dict]:
    result = rsx(lab, "history", "--json", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


# ------------------------------------------------------------------------------ rsx history
def test_history_lists_newest_first_with_short_hashes_and_captions(toy_lab, audited):
    result = rsx(toy_lab, "history")
    assert result.exit_code == 0, result.output
    header, *rows, footer = result.stdout.splitlines()
    assert header.split()[:4] == ["id", "time", "(UTC)", "sha256"]
    assert [int(row.split()[0]) for row in rows] == sorted(audited.values(), reverse=True)
    long_row = next(row for row in rows if "three.png" in row)
    sha = hash_bytes(b"three.png")
    assert f" {sha[:12]} " in long_row and sha not in long_row  # the hash is shortened
    assert "A LIGHTHOUSE in fog, very" in long_row and "long" not in long_row.split()
    assert "..." in long_row and long_row.rstrip().endswith("three.png")
    assert footer == "1-5 of 5 records"


def test_history_filters_by_image_verdict_and_caption(toy_lab, audited, tmp_path):
    by_path = tmp_path / "suspect.png"
    by_path.write_bytes(b"the suspect's bytes")
    suspect = record(toy_lab, image=str(by_path), caption=CAPTION, sha256=hash_file(by_path))

    def ids(*args: str) -> list[int]:
        return [entry["query_id"] for entry in history_json(toy_lab, *args)]

    one = hash_bytes(b"one.png")
    assert ids("--image", one[:6]) == [audited["one.png#3"], audited["one.png#0"]]
    assert ids("--image", one.upper()) == [audited["one.png#3"], audited["one.png#0"]]
    assert ids("--image", str(by_path)) == [suspect]  # a file is hashed
    assert ids("--verdict", "unknown") == [audited["three.png#2"]]
    assert ids("--verdict", "toy-b") == [audited["two.png#1"]]
    assert ids("--verdict", "toy") == []  # exact, not a prefix
    assert ids("--caption", "lighthouse") == [suspect, audited["three.png#2"], audited["two.png#1"]]
    assert ids("--caption", "50%") == [audited["four.png#4"]]  # LIKE wildcards are literal
    assert ids("--caption", "a_s") == [audited["four.png#4"]]
    assert ids("--caption", "lighthouse", "--verdict", "toy-a") == [suspect]
    assert ids("--image", one[:8], "--verdict", "unknown") == []
    nothing = rsx(toy_lab, "history", "--verdict", "nobody")
    assert nothing.exit_code == 0 and nothing.stdout == "no queries match\n"


def test_history_pages_with_limit_and_offset(toy_lab, audited):
    newest_first = sorted(audited.values(), reverse=True)
    pages = [
        [entry["query_id"] for entry in history_json(toy_lab, "--limit", "2", "--offset", str(o))]
        for o in (0, 2, 4, 6)
    ]
    assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:], []]
    table = rsx(toy_lab, "history", "--limit", "2", "--offset", "2")
    assert table.stdout.splitlines()[-1] == "3-4 of 5 records; --offset 4 for more"
    past = rsx(toy_lab, "history", "--offset", "9")
    assert past.exit_code == 0 and past.stdout == "no records past the first 9: 5 records\n"
    for bad in (["--limit", "0"], ["--offset", "-1"]):
        assert rsx(toy_lab, "history", *bad).exit_code == 2


def test_history_json_is_one_full_object_per_line(toy_lab, audited):
    entries = history_json(toy_lab, "--verdict", "unknown")
    assert len(entries) == 1
    [entry] = entries
    assert set(entry) == {
        "query_id",
        "created_at",
        "sha256",
        "image",
        "verdict",
        "caption",
        "caption_source",
    }
    assert entry["sha256"] == hash_bytes(b"three.png")  # whole, not shortened
    assert entry["caption"].endswith("very long") and entry["caption_source"] == "explicit"
    assert entry["created_at"].endswith("+00:00")  # UTC, said so
    assert rsx(toy_lab, "history", "--json", "--verdict", "nobody").stdout == ""


def test_history_refuses_a_bad_image_in_one_line(toy_lab, tmp_path):
    for value, expected in (
        (str(tmp_path / "missing.png"), "no such file"),
        ("abc12", "no such file"),  # too short for a prefix
        (str(tmp_path), "is a folder"),
    ):
        result = rsx(toy_lab, "history", "--image", value)
        assert result.exit_code == 1
        assert result.output.count("\n") == 1 and expected in result.output, result.output


# ------------------------------------------------------------------------------ rsx show
def stored_answer(lab_dir: Path, query_id: int) -> str:
    with Lab.open(lab_dir) as lab, lab.session() as session:
        stored = audit.recorded_answer(session, query_id)
    assert stored is not None
    return stored


def test_show_json_is_the_stored_answer_byte_for_byte(toy_lab, audited):
    query_id = audited["two.png#1"]
    result = rsx(toy_lab, "show", str(query_id), "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout == stored_answer(toy_lab, query_id) + "\n"
    assert json.loads(result.stdout)["query_id"] == query_id


def test_show_renders_the_recorded_table(toy_lab, audited):
    query_id = audited["three.png#2"]
    result = rsx(toy_lab, "show", str(query_id))
    assert result.exit_code == 0, result.output
    answer = QueryResult.from_json(json.loads(stored_answer(toy_lab, query_id)))
    assert result.stdout == render_answer(answer) + "\n"
    assert "verdict: unknown" in result.stdout


def test_show_an_unknown_id_is_one_line_and_exit_1(toy_lab, audited):
    for query_id in ("999", "0"):
        result = rsx(toy_lab, "show", query_id)
        assert result.exit_code == 1
        expected = f"Error: no query {query_id} in this lab; 'rsx history' lists them\n"
        assert result.output == expected
    assert rsx(toy_lab, "show", "--", "-3").exit_code == 1


def test_show_report_writes_refuses_to_overwrite_and_checks_the_folder_first(
    toy_lab, audited, tmp_path
):
    query_id = str(audited["two.png#1"])
    report = tmp_path / "answer.html"
    written = rsx(toy_lab, "show", query_id, "--report", str(report))
    assert written.exit_code == 0, written.output
    html = report.read_text(encoding="utf-8")
    assert "two.png" in html and CAPTION in html and "verdict: toy-b" in html

    report.write_text("an earlier report", encoding="utf-8")
    refused = rsx(toy_lab, "show", query_id, "--report", str(report))
    assert refused.exit_code == 1 and "already exists; pass --force" in refused.output
    assert report.read_text(encoding="utf-8") == "an earlier report"  # untouched
    forced = rsx(toy_lab, "show", query_id, "--report", str(report), "--force")
    assert forced.exit_code == 0 and "verdict: toy-b" in report.read_text(encoding="utf-8")

    # the folder is checked before anything else: not even the lab is opened
    nowhere = tmp_path / "no-such-folder" / "r.html"
    missing = rsx(tmp_path / "no-lab-here", "show", query_id, "--report", str(nowhere))
    assert missing.exit_code == 1
    assert missing.output == (
        f"Error: cannot write the report {nowhere}: folder {nowhere.parent} does not exist\n"
    )
    assert not (tmp_path / "no-lab-here").exists()
    both = rsx(toy_lab, "show", query_id, "--json", "--report", str(report))
    assert both.exit_code == 1 and "do not go together" in both.output


@pytest.mark.slow
def test_show_gives_back_what_query_printed(toy_lab, make_toy_image, tmp_path):
    image = make_toy_image("toy-b", CAPTION)
    printed = rsx(toy_lab, "query", str(image), "--caption", CAPTION, "--json")
    assert printed.exit_code == 0, printed.output
    [line] = printed.stdout.splitlines()
    query_id = json.loads(line)["query_id"]
    shown = rsx(toy_lab, "show", str(query_id), "--json")
    assert shown.exit_code == 0 and shown.stdout == line + "\n"  # byte for byte

    table = rsx(toy_lab, "query", str(image), "--caption", CAPTION)  # answered again: a new id
    assert table.exit_code == 0, table.output
    [entry] = history_json(toy_lab, "--limit", "1")
    again = rsx(toy_lab, "show", str(entry["query_id"]))
    assert again.exit_code == 0 and again.stdout == table.stdout
    assert entry["sha256"] == hash_file(image) and entry["image"] == str(image)

    report = tmp_path / "shown.html"
    assert rsx(toy_lab, "show", str(query_id), "--report", str(report)).exit_code == 0
    assert report.read_text(encoding="utf-8").count("data:image/png;base64,") == 4  # + 3 nearest


# ------------------------------------------------------------------------------ rsx info
def info_json(lab: Path) -> dict:
    result = rsx(lab, "info", "--json")
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    return json.loads(line)


def test_info_reports_the_lab_its_embedder_generators_and_counts(toy_lab, audited):
    assert rsx(toy_lab, "generator", "remove", "toy-c").exit_code == 0
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    with Lab.open(toy_lab) as lab, lab.session() as session:
        mj = repository.generator_by_name(session, "mj")
        assert mj is not None
        repository.add_pending(session, mj.id, hash_bytes(CAPTION.encode()))
        settings, head = lab.settings, migrate.head_revision(lab.engine)

    facts = info_json(toy_lab)
    assert facts["lab"] == str(toy_lab.resolve())
    assert facts["database"]["path"] == str((toy_lab / "lab.sqlite").resolve())
    assert facts["database"]["bytes"] == (toy_lab / "lab.sqlite").stat().st_size > 0
    assert facts["schema"] == {"current": head, "head": head, "up_to_date": True}
    assert facts["embedder"] == {
        "label": "toy",
        "fingerprint": settings.embedder_fingerprint,
        "dim": settings.embedder_dim,
        "layer": None,
        "precision": settings.embedder_precision,
    }
    generators = facts["generators"]
    assert (generators["active"], generators["retired"]) == (3, 1)
    assert {(g["name"], g["kind"], g["retired"]) for g in generators["list"]} == {
        ("mj", "imported", False),
        ("toy-a", "toy", False),
        ("toy-b", "toy", False),
        ("toy-c", "toy", True),
    }
    assert facts["counts"] == {
        "images": 0,
        "captions": 4,  # the five answers asked about four captions
        "resyntheses": 0,
        "references": 0,
        "embeddings": 0,
        "other_embeddings": 0,
        "queries": 5,
        "pending_work_orders": 1,
    }
    assert facts["disk"]["blobs"]["files"] == 0 and facts["disk"]["models"]["bytes"] > 0
    index = facts["index"]
    # made empty by rsx init, so a run killed before its first sync leaves a lagging index
    assert (index["exists"], index["vectors"], index["database_embeddings"]) == (True, 0, 0)
    assert index["state"] == "in step with the database"

    table = rsx(toy_lab, "info")
    assert table.exit_code == 0, table.output
    lines = {line.split()[0]: line for line in table.stdout.splitlines()}
    assert set(lines) == {
        "lab",
        "database",
        "schema",
        "embedder",
        "generators",
        "counts",
        "disk",
        "index",
    }
    assert f"fingerprint {settings.embedder_fingerprint[:12]} " in lines["embedder"]
    assert settings.embedder_fingerprint not in lines["embedder"]
    assert "3 active, 1 retired: mj (imported), toy-a (toy)" in lines["generators"]
    assert "toy-c (toy, retired)" in lines["generators"]
    assert "5 queries" in lines["counts"] and "1 pending work order" in lines["counts"]
    assert "1 pending work orders" not in lines["counts"]  # the noun agrees with its count


@pytest.mark.slow
def test_info_compares_the_index_file_with_the_database(toy_lab, make_toy_image):
    images = [str(make_toy_image(g, f"c{i}")) for i, g in enumerate(["toy-a", "toy-b"])]
    assert rsx(toy_lab, "ingest", *images).exit_code == 0
    facts = info_json(toy_lab)
    index = facts["index"]
    assert facts["counts"]["images"] == facts["counts"]["embeddings"] == 2
    assert index["vectors"] == index["database_embeddings"] == 2
    assert index["watermark"] == index["database_max_id"]
    assert index["state"] == "in step with the database"
    assert facts["disk"]["blobs"]["files"] == 2 and facts["disk"]["index"]["files"] == 1

    Path(index["path"]).unlink()
    index = info_json(toy_lab)["index"]
    assert (index["exists"], index["vectors"]) == (False, None)
    assert index["state"].startswith("missing")
