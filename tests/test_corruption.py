"""Corruption: a damaged index is rebuilt from the database; a damaged blob is named, never used.

What "used" means for a blob: its bytes are read when an image is embedded (ingest, a query,
``rsx check --repair``) and when a report shows its thumbnail. Both paths verify the SHA-256
first and refuse bytes that no longer match. A stored embedding is NOT re-derived from the blob:
it was computed from verified bytes when the image entered the lab, so it stays valid evidence
and a query may still use it after the blob is damaged. The report then shows no thumbnail for
that image, and ``rsx check`` names the blob until it is restored (re-ingesting the original file
rewrites it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile_files import (
    file_sha,
    good_images,
    index_problems,
    rsx,
    store_state,
    with_imported_resynthesis,
)
from sqlalchemy import delete, select

from resynth_index.lab import Lab
from resynth_index.store.models import EmbeddingRow, ImageRow

CAPTION = "a red bicycle against a wall"


@pytest.fixture
def lab(toy_lab: Path, tmp_path: Path) -> Path:
    return toy_lab


def query(lab: Path, image: Path, *extra: str):
    return rsx(
        lab, "query", str(image), "--caption", CAPTION, "--candidates", "imp", "--no-generate",
        "--json", *extra,
    )  # fmt: skip


def index_path(lab: Path) -> Path:
    with Lab.open(lab) as opened:
        return opened.index_path


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        lambda p: p.write_bytes(p.read_bytes()[:30]),
        lambda p: p.unlink(),
    ],
    ids=["truncated-half", "truncated-header", "deleted"],
)
def test_a_damaged_index_is_detected_then_rebuilt_from_the_database(lab, tmp_path, damage):
    with_imported_resynthesis(lab, tmp_path / "imp", CAPTION)
    [suspect] = good_images(tmp_path / "q", 1, seed=42)
    first = query(lab, suspect)
    assert first.exit_code == 0, first.output
    distances = json.loads(first.stdout)["ranking"][0]["distances"]
    path = index_path(lab)

    damage(path)
    check = rsx(lab, "check")
    assert check.exit_code == 1
    assert f"problem: index {path.name}: index file" in check.output  # missing / unreadable
    again = query(lab, suspect)  # a query reads its vectors from the database, not the index
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["ranking"][0]["distances"] == distances
    assert rsx(lab, "check").exit_code == 1  # and never writes the index: the damage stays
    synced = rsx(lab, "index", "sync")  # rebuilds it from the database
    assert synced.exit_code == 0 and "rebuilt from the database" in synced.output
    assert index_problems(lab) == []
    assert rsx(lab, "check").exit_code == 0

    damage(path)  # and the other way to mend it: rsx check --repair
    repaired = rsx(lab, "check", "--repair")
    assert repaired.exit_code == 0 and "rebuilt index" in repaired.output
    assert index_problems(lab) == []


def damage_blob(lab: Path, sha256: str, how: str) -> Path:
    with Lab.open(lab) as opened:
        path = opened.blobs.path_for(sha256)
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-8] + b"tampered")
    return path


@pytest.mark.parametrize("how", ["missing", "altered"])
def test_a_damaged_blob_is_named_with_its_hash_and_not_repairable(lab, tmp_path, how):
    [image] = good_images(tmp_path / "in", 1)
    assert rsx(lab, "ingest", str(image)).exit_code == 0
    sha = file_sha(image)
    damage_blob(lab, sha, how)
    before = store_state(lab)

    for args in (["check"], ["check", "--repair"]):
        result = rsx(lab, *args)
        assert result.exit_code == 1
        expected = "missing from the blob store" if how == "missing" else "altered"
        assert f"problem: blob {sha}: {expected}" in result.output
        assert f"cannot repair: blob {sha}" in result.output
    after = store_state(lab)
    assert after.images == before.images and after.embeddings == before.embeddings

    assert rsx(lab, "ingest", str(image)).exit_code == 0  # the original file restores it
    assert rsx(lab, "check").exit_code == 0


@pytest.mark.parametrize("how", ["missing", "altered"])
def test_a_damaged_blob_is_not_embedded(lab, tmp_path, how):
    """No stored embedding: the query must refuse, naming the blob, instead of embedding it."""
    resynthesis = with_imported_resynthesis(lab, tmp_path / "imp", CAPTION)
    sha = file_sha(resynthesis)
    with Lab.open(lab) as opened, opened.session() as session:
        image_id = session.scalar(select(ImageRow.id).where(ImageRow.sha256 == sha))
        session.execute(delete(EmbeddingRow).where(EmbeddingRow.image_id == image_id))
    damage_blob(lab, sha, how)
    before = store_state(lab)

    [suspect] = good_images(tmp_path / "q", 1, seed=43)
    result = query(lab, suspect)
    assert result.exit_code == 1
    [line] = [line for line in result.output.splitlines() if sha in line]
    assert ("missing" if how == "missing" else "hash mismatch") in line
    after = store_state(lab)
    assert after.embeddings == before.embeddings  # nothing embedded from the damaged blob
    assert after.queries == before.queries

    repair = rsx(lab, "check", "--repair")  # the repair path refuses it too
    assert repair.exit_code == 1 and f"cannot repair: image {image_id}: blob {sha}" in repair.output
    with Lab.open(lab) as opened, opened.session() as session:
        embedded = session.scalars(select(EmbeddingRow.image_id)).all()
    assert image_id not in embedded


def test_an_altered_resynthesis_keeps_its_embedding_but_not_its_thumbnail(lab, tmp_path):
    resynthesis = with_imported_resynthesis(lab, tmp_path / "imp", CAPTION)
    [suspect] = good_images(tmp_path / "q", 1, seed=44)
    clean_report, damaged_report = tmp_path / "clean.html", tmp_path / "damaged.html"
    clean = query(lab, suspect, "--report", str(clean_report))
    assert clean.exit_code == 0, clean.output
    assert clean_report.read_text().count("<img ") == 2  # the query and imp's resynthesis

    damage_blob(lab, file_sha(resynthesis), "altered")
    answer = query(lab, suspect, "--report", str(damaged_report))
    assert answer.exit_code == 0, answer.output  # the vector came from the verified bytes
    first, second = json.loads(clean.stdout), json.loads(answer.stdout)
    assert second["ranking"] == first["ranking"]
    html = damaged_report.read_text()
    assert html.count("<img ") == 1  # the altered bytes are not shown
    assert rsx(lab, "check").exit_code == 1  # and the damage stays reported
