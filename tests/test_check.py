"""`rsx check` finds where the database, blobs and index disagree; --repair mends it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.cli import cli
from resynth_index.lab import Lab

pytestmark = pytest.mark.slow  # end to end through the CLI: not in the quick loop


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def _ingest_three(lab: Path, make_toy_image) -> None:
    paths = [str(make_toy_image(g, f"c{i}")) for i, g in enumerate(["toy-a", "toy-b", "toy-c"])]
    assert rsx(lab, "ingest", *paths).exit_code == 0


def test_fresh_and_populated_labs_check_clean(toy_lab, make_toy_image):
    assert rsx(toy_lab, "check").exit_code == 0
    _ingest_three(toy_lab, make_toy_image)
    result = rsx(toy_lab, "check")
    assert result.exit_code == 0 and "ok" in result.output


def test_deleted_or_truncated_index_is_reported_and_rebuilt(toy_lab, make_toy_image):
    _ingest_three(toy_lab, make_toy_image)
    with Lab.open(toy_lab) as lab:
        index_path = lab.index_path
    index_path.write_bytes(index_path.read_bytes()[:40])
    result = rsx(toy_lab, "check")
    assert result.exit_code == 1 and "index" in result.output
    repaired = rsx(toy_lab, "check", "--repair")
    assert repaired.exit_code == 0 and "rebuilt index" in repaired.output
    assert rsx(toy_lab, "check").exit_code == 0

    index_path.unlink()
    assert rsx(toy_lab, "check").exit_code == 1
    assert rsx(toy_lab, "check", "--repair").exit_code == 0
    assert index_path.exists()


def test_altered_or_missing_blob_is_named_and_not_repairable(toy_lab, make_toy_image):
    _ingest_three(toy_lab, make_toy_image)
    with Lab.open(toy_lab) as lab:
        shas = sorted(lab.blobs.iter_shas())
        altered, missing = lab.blobs.path_for(shas[0]), lab.blobs.path_for(shas[1])
    altered.write_bytes(altered.read_bytes() + b"tampered")
    missing.unlink()
    result = rsx(toy_lab, "check", "--repair")
    assert result.exit_code == 1
    assert f"problem: blob {shas[0]}: altered" in result.output  # said as it is, not "missing"
    assert f"problem: blob {shas[1]}: missing" in result.output
    assert f"cannot repair: blob {shas[0]}: altered" in result.output
    assert f"cannot repair: blob {shas[1]}: missing" in result.output


def test_orphan_blob_is_removed_by_repair(toy_lab):
    with Lab.open(toy_lab) as lab:
        data = b"orphan bytes"
        sha = hashlib.sha256(data).hexdigest()
        lab.blobs.put(sha, data)
    assert rsx(toy_lab, "check").exit_code == 1
    assert rsx(toy_lab, "check", "--repair").exit_code == 0
    assert rsx(toy_lab, "check").exit_code == 0


# --- repair never races a writer: a blob is written before its row ---------------------------


def _orphan(lab: Lab) -> str:
    data = b"bytes no row points at"
    sha = hashlib.sha256(data).hexdigest()
    lab.blobs.put(sha, data)
    return sha


def test_an_unreferenced_blob_is_no_problem_while_a_writer_is_at_work(toy_lab):
    with Lab.open(toy_lab) as lab:
        sha = _orphan(lab)
        with lab.blobs.writing():  # a writer between its blob and its row
            result = rsx(toy_lab, "check", "--repair")
            assert result.exit_code == 0, result.output
            assert "note: 1 blob(s) or temporary file(s) not yet referenced left alone" in (
                result.output
            )
            assert "removed" not in result.output and lab.blobs.exists(sha)
        result = rsx(toy_lab, "check")  # the writer is gone: now it is debris
        assert result.exit_code == 1 and f"blob {sha}: not referenced" in result.output


@pytest.mark.parametrize("point", ["blob-write", "image-row"])
def test_repair_during_an_ingest_loses_nothing(toy_lab, make_toy_image, monkeypatch, point):
    """``rsx check --repair`` runs while an ingest has a temp file written (blob-write) or a blob
    stored without its row (image-row): the ingest completes and nothing is lost."""
    from resynth_index.pipeline import intake
    from resynth_index.pipeline.ingest import expand_paths, ingest
    from resynth_index.store import blobs

    paths = [make_toy_image(g, f"c{i}") for i, g in enumerate(["toy-a", "toy-b"])]
    reports = []

    def repair_now(name: str) -> None:
        if name == point and not reports:
            with Lab.open(toy_lab) as other:
                reports.append(other.check(repair=True))

    monkeypatch.setattr(blobs, "crash_point", repair_now)
    monkeypatch.setattr(intake, "crash_point", repair_now)
    with Lab.open(toy_lab) as lab:
        summary = ingest(lab, expand_paths(paths))
    assert summary.added == 2 and not summary.failures, summary.failures
    [report] = reports
    assert not report.repaired and report.notes  # it saw the writer and left its files alone
    check = rsx(toy_lab, "check")
    assert check.exit_code == 0, check.output
    with Lab.open(toy_lab) as lab:
        assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths} <= set(
            lab.blobs.iter_shas()
        )
