"""`rsx check` finds where the database, blobs and index disagree; --repair mends it."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from resynth_index.cli import cli
from resynth_index.lab import Lab


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
    assert shas[0] in result.output and shas[1] in result.output
    assert "cannot repair" in result.output


def test_orphan_blob_is_removed_by_repair(toy_lab):
    with Lab.open(toy_lab) as lab:
        data = b"orphan bytes"
        import hashlib

        sha = hashlib.sha256(data).hexdigest()
        lab.blobs.put(sha, data)
    assert rsx(toy_lab, "check").exit_code == 1
    assert rsx(toy_lab, "check", "--repair").exit_code == 0
    assert rsx(toy_lab, "check").exit_code == 0
