"""`rsx check` finds where the database, blobs and index disagree; --repair mends it."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.cli import cli
from resynth_index.lab import Lab
from resynth_index.pipeline.check import check as check_the_lab

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


def test_a_damaged_blob_is_named_by_the_images_it_is(toy_lab, make_toy_image):
    """A hash alone says nothing to whoever must restore the file: each damaged blob's line
    says what its image is to the lab (query, reference of G, resynthesis by G of caption C
    seed S) and the path it was first seen under."""
    from resynth_index.hashing import hash_file

    reference = make_toy_image("toy-a", "a red barn", name="barn.png")
    resynthesis = make_toy_image("toy-b", "a lighthouse at dusk", name="delivered.png")
    suspect = make_toy_image("toy-c", "a lighthouse at dusk", name="suspect.png")
    for path in (reference, resynthesis, suspect):  # not just written: their digests are kept
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    ingests = [
        [str(reference), "--role", "reference", "--generator", "toy-a", "--caption", "a barn"],
        [str(resynthesis), "--role", "resynthesis", "--generator", "mj"]
        + ["--caption", "a lighthouse at dusk", "--seed", "0"],
    ]
    for args in ingests:
        assert rsx(toy_lab, "ingest", *args).exit_code == 0
    asked = rsx(
        toy_lab, "query", str(suspect), "--candidates", "mj", "--caption", "a lighthouse at dusk"
    )
    assert asked.exit_code == 0, asked.output
    shas = {path: hash_file(path) for path in (reference, resynthesis, suspect)}
    with Lab.open(toy_lab) as lab:
        for sha in shas.values():
            blob = lab.blobs.path_for(sha)
            blob.write_bytes(blob.read_bytes() + b"tampered")
    result = rsx(toy_lab, "check")
    assert result.exit_code == 1
    lines = {
        sha: next(line for line in result.output.splitlines() if sha in line)
        for sha in shas.values()
    }
    assert lines[shas[reference]].endswith(
        "altered: its bytes no longer match their SHA-256; the image of: reference of toy-a;"
        f" first seen as {reference.resolve()}"
    )
    made = lines[shas[resynthesis]]
    assert "the image of: resynthesis by mj of 'a lighthouse at dusk' seed 0;" in made
    assert lines[shas[suspect]].endswith(f"the image of: query; first seen as {suspect}")


def test_an_orphan_blob_goes_to_quarantine_never_away(toy_lab, tmp_path):
    """One orphan among ten blobs (10 %): a repair moves it to the lab's quarantine, where a
    check notes it, and only --purge-quarantine deletes it."""
    from hostile_files import good_images

    good_images(tmp_path / "incoming", 9)
    assert rsx(toy_lab, "ingest", str(tmp_path / "incoming")).exit_code == 0
    with Lab.open(toy_lab) as lab:
        sha = _orphan(lab)
        quarantined = lab.quarantine.path_for(sha)
    assert rsx(toy_lab, "check").exit_code == 1
    repaired = rsx(toy_lab, "check", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: moved 1 orphan blob to quarantine" in repaired.output
    assert quarantined.read_bytes() == b"bytes no row points at"
    noted = rsx(toy_lab, "check")
    assert noted.exit_code == 0 and "1 blob(s) in quarantine" in noted.output
    purged = rsx(toy_lab, "check", "--repair", "--purge-quarantine")
    assert purged.exit_code == 0 and "deleted 1 quarantined blob(s)" in purged.output
    assert not quarantined.exists()
    assert rsx(toy_lab, "check").output == "ok: database, blobs and index agree\n"


def test_orphans_of_a_database_without_images_stay_unless_forced(toy_lab):
    with Lab.open(toy_lab) as lab:
        sha = _orphan(lab)
    held = rsx(toy_lab, "check", "--repair")
    assert held.exit_code == 1
    assert "the database holds no image at all" in held.output
    assert "fix:" not in held.output  # no repair is offered: it would move the evidence
    with Lab.open(toy_lab) as lab:
        assert lab.blobs.exists(sha)
    forced = rsx(toy_lab, "check", "--repair", "--force")
    assert forced.exit_code == 0, forced.output
    with Lab.open(toy_lab) as lab:
        assert not lab.blobs.exists(sha) and lab.quarantine.path_for(sha).is_file()


def test_force_and_purge_go_with_repair(toy_lab):
    for flag in ("--force", "--purge-quarantine"):
        result = rsx(toy_lab, "check", flag)
        assert result.exit_code == 2 and "go with --repair" in result.output


def test_a_blob_the_database_names_comes_back_from_quarantine(toy_lab, make_toy_image):
    _ingest_three(toy_lab, make_toy_image)
    with Lab.open(toy_lab) as lab:
        sha = sorted(lab.blobs.iter_shas())[0]
        lab.quarantine.take(lab.blobs, sha)  # as a repair against an older database would
    check = rsx(toy_lab, "check")
    assert check.exit_code == 1 and f"blob {sha}: in quarantine, yet the database names it" in (
        check.output
    )
    repaired = rsx(toy_lab, "check", "--repair")
    assert repaired.exit_code == 0 and "moved 1 blob(s) back from quarantine" in repaired.output
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
    from resynth_index.pipeline.ingest import ingest
    from resynth_index.pipeline.ingest_items import expand_paths
    from resynth_index.store import blobs

    paths = [make_toy_image(g, f"c{i}") for i, g in enumerate(["toy-a", "toy-b"])]
    reports = []

    def repair_now(name: str) -> None:
        if name == point and not reports:
            with Lab.open(toy_lab) as other:
                reports.append(check_the_lab(other, repair=True))

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


@pytest.mark.parametrize("writer", ["query", "resynthesize"])
def test_images_a_writer_has_not_embedded_yet_are_no_damage(
    toy_lab, make_toy_image, monkeypatch, writer
):
    """A query (or a resynthesis run) stores its images, then embeds them: a check meanwhile
    notes them and repairs nothing, because the writer holds the blob store's lock until its
    embeddings are stored (a service under load is such a writer, all the time)."""
    from resynth_index.media.captions import caption_hash
    from resynth_index.pipeline import intake
    from resynth_index.pipeline.plans import runnable_generators
    from resynth_index.pipeline.query import run_queries
    from resynth_index.pipeline.resynthesis import resynthesize

    image = make_toy_image("toy-a", "a kite")
    reports = []

    def check_now(name: str) -> None:
        if name == "embedding" and not reports:
            with Lab.open(toy_lab) as other:
                reports.append(check_the_lab(other, repair=True))

    monkeypatch.setattr(intake, "crash_point", check_now)
    with Lab.open(toy_lab) as lab:
        if writer == "query":
            [answer] = run_queries(lab, [image], caption="a kite", candidates=["toy-a"])
            assert answer.verdict == "toy-a"
        else:
            resynthesize(lab, {caption_hash("a kite"): "a kite"}, runnable_generators(lab))
    [report] = reports
    assert not report.problems and not report.repaired, report.problems
    assert any("without an embedding left alone: a writer" in note for note in report.notes)
    monkeypatch.undo()
    assert rsx(toy_lab, "check").exit_code == 0


# --- the report: grouped, summed up, with the fix; stray files named and left alone -----------


def _orphans(lab: Lab, count: int) -> list[str]:
    shas = []
    for number in range(count):
        data = f"blob {number} of an interrupted ingest".encode()
        shas.append(hashlib.sha256(data).hexdigest())
        lab.blobs.put(shas[-1], data)
    return sorted(shas)


def test_an_interrupted_ingest_is_summed_up_with_the_fix_to_run(toy_lab, make_toy_image):
    _ingest_three(toy_lab, make_toy_image)
    with Lab.open(toy_lab) as lab:
        shas = _orphans(lab, 32)  # blobs whose rows never committed
        lab.index_path.unlink()  # and the index was never saved
        index_name = lab.index_path.name

    result = rsx(toy_lab, "check")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    orphan_lines = [line for line in lines if "(orphan)" in line]
    assert orphan_lines == [
        f"problem: blob {sha}: not referenced by the database (orphan)" for sha in shas[:5]
    ]
    assert "problem: ... and 27 more orphan blobs" in lines
    assert f"problem: index {index_name}: index file missing" in lines
    assert (
        "problem: 32 orphan blob(s) left in place: 32 of 35 blobs (91 %) is more than the 10 %"
        " a repair moves on its own; rerun the interrupted ingest or query (it stores their"
        f" rows), restore the lab's database ({toy_lab / 'lab.sqlite'}) from its newest backup,"
        " or quarantine them with --repair --force"
    ) in lines
    assert lines[-2:] == [
        "34 problems: 32 orphan blobs, orphan blobs held back, index file missing",
        f"fix: rsx --lab {toy_lab} check --repair  (rebuilds the index from the database)",
    ]
    every = rsx(toy_lab, "check", "--all")
    assert sum("(orphan)" in line for line in every.output.splitlines()) == 32
    assert "more orphan blobs" not in every.output

    repaired = rsx(toy_lab, "check", "--repair", "--force")
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: moved 32 orphan blobs to quarantine" in repaired.output
    assert f"repaired: rebuilt index {index_name} from 3 embedding(s)" in repaired.output
    assert repaired.output.splitlines()[-1] == (
        "33 problems: 32 orphan blobs, index file missing; all repaired"
    )
    again = rsx(toy_lab, "check")
    assert again.exit_code == 0 and "ok: database, blobs and index agree" in again.output


def test_stray_files_are_named_and_never_removed(toy_lab):
    with Lab.open(toy_lab) as lab:
        root = lab.blobs.root
        misfiled = hashlib.sha256(b"misfiled").hexdigest()
        (root / misfiled).write_bytes(b"misfiled")  # a blob's name, not in its folder
        (root / "notes.txt").write_text("someone's notes")
        (root / "ab").mkdir(exist_ok=True)
        (root / "ab" / "abcd.png").write_bytes(b"not named as a blob")
        temp_folder = lab.blobs.path_for(misfiled).parent
        temp_folder.mkdir(parents=True, exist_ok=True)
        temp = temp_folder / f".tmp-{misfiled[:16]}-000000000000"  # left by a crashed put
        temp.write_bytes(b"half a blob")
    strays = [root / misfiled, root / "notes.txt", root / "ab" / "abcd.png"]

    result = rsx(toy_lab, "check")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert (
        f"problem: stray file blobs/{misfiled}: named as a blob but filed elsewhere"
        f" (its place: {misfiled[:2]}/{misfiled[2:4]}/{misfiled})" in lines
    )
    assert (
        "problem: stray file blobs/notes.txt: not a blob nor a temporary file of the blob store"
        in lines
    )
    assert "problem: stray file blobs/ab/abcd.png: not a blob" in result.output
    assert (
        "note: 1 temporary file(s) left in the blob store by an interrupted write"
        " ('rsx check --repair' removes them)" in lines
    )
    assert lines[-2:] == [
        "3 problems: 3 stray files",
        "by hand: move the stray files out of the blob store (a blob filed in the wrong folder"
        " belongs where its line says)",
    ]
    assert not any(line.startswith("fix:") for line in lines)  # --repair would not mend them

    repaired = rsx(toy_lab, "check", "--repair")
    assert repaired.exit_code == 1  # the strays remain
    assert "repaired: removed 1 temporary file(s) left by an interruption" in repaired.output
    assert "cannot repair: stray file blobs/notes.txt: rsx leaves" in repaired.output
    assert repaired.output.splitlines()[-2] == "3 problems: 3 stray files; 3 cannot be repaired"
    assert all(path.exists() for path in strays) and not temp.exists()


def test_a_temporary_file_is_left_alone_while_a_writer_is_at_work(toy_lab):
    with Lab.open(toy_lab) as lab:
        folder = lab.blobs.root / "ab" / "cd"
        folder.mkdir(parents=True)
        temp = folder / ".tmp-abcd000000000000-000000000000"
        temp.write_bytes(b"being written")
        with lab.blobs.writing():
            result = rsx(toy_lab, "check", "--repair")
            assert result.exit_code == 0, result.output
            assert "note: 1 blob(s) or temporary file(s) not yet referenced left alone" in (
                result.output
            )
            assert temp.exists()
        assert rsx(toy_lab, "check").exit_code == 0  # debris, said in a note, not a problem
        assert rsx(toy_lab, "check", "--repair").exit_code == 0
        assert not temp.exists()


def test_unreferenced_blobs_in_a_folder_outside_the_lab_are_never_removed(toy_lab, tmp_path):
    from resynth_index.pipeline.check import check_lab
    from resynth_index.store.blobs import BlobStore

    with Lab.open(toy_lab) as lab:
        lab.blobs = BlobStore(tmp_path / "shared-blobs")  # as 'rsx init --blobs' would have it
        [sha] = _orphans(lab, 1)  # another lab's blob, for all this lab knows
        report = check_lab(lab, repair=True)
        assert not report.problems and not report.repaired
        assert report.notes == [
            f"1 blob(s) not referenced by this lab's database left alone: the blob folder"
            f" {lab.blobs.root} lies outside the lab and may serve other labs"
        ]
        assert lab.blobs.exists(sha)


def test_the_summary_counts_each_kind_once_per_problem():
    from resynth_index.store.integrity import CheckReport

    report = CheckReport()
    assert report.summary() == ""
    report.problem("image without an embedding", "4 image(s) have no embedding", 4)
    report.problem("index out of step with the database", "index x: holds 3 vectors, database 5")
    report.problem("index out of step with the database", "index x: watermark 3 behind 5")
    report.problem("orphan blob", "blob a: orphan")
    assert report.summary() == (
        "6 problems: 1 orphan blob, 4 images without an embedding,"
        " index out of step with the database"
    )
    assert report.repairs() == [
        "moves the orphan blobs to the lab's quarantine",
        "embeds them",
        "rebuilds the index from the database",
    ]
    with pytest.raises(ValueError):
        report.problem("gremlin", "not a kind rsx knows")
