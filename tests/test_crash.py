"""Crashes: an ``rsx ingest`` killed with SIGKILL at any point loses nothing that committed.

``RSX_CRASH_AT=POINT:N`` (resynth_index/store/faults.py) makes the process kill itself the N-th
time it reaches a crash point: a blob half-written (blob-write), a blob without its row (image-row),
rows without embeddings (embedding), an index file half-saved (index-save). After each kill
``rsx check`` is clean or ``rsx check --repair`` makes it clean, and re-running the same ingest
ends with every file stored exactly once, embedded once, and an index that agrees with the
database. The same re-run without any repair must get there too (ingest is resumable).

Each case starts one ingest process (about 5 s on two cores), hence the slow mark.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from hostile_files import file_sha, good_images, index_problems, rsx, rsx_process, store_state

from resynth_index.store.faults import CRASH_ENV

FILES = 6
BATCH = "2"  # three batches, so the per-batch points recur

# 7 kill points: (point, which time it is reached); each is reached at least that often
KILLS = [
    ("blob-write", 1),
    ("blob-write", 5),
    ("image-row", 2),
    ("image-row", 6),
    ("embedding", 2),
    ("embedding", 3),
    ("index-save", 1),
]


def assert_complete(lab: Path, files: list[Path]) -> None:
    state = store_state(lab)
    assert state.images == {file_sha(p) for p in files}  # each file once, nothing else
    assert state.blobs == state.images
    assert state.embeddings == state.embedded_images == len(files)
    assert index_problems(lab) == []
    check = rsx(lab, "check")
    assert check.exit_code == 0, check.output


@pytest.mark.slow
@pytest.mark.parametrize(("point", "nth"), KILLS, ids=[f"{p}-{n}" for p, n in KILLS])
def test_ingest_killed_then_checked_and_rerun(toy_lab, tmp_path, point, nth):
    files = good_images(tmp_path / "incoming", FILES)
    folder = str(tmp_path / "incoming")

    killed = rsx_process(
        toy_lab, "ingest", folder, "--batch-size", BATCH, env={CRASH_ENV: f"{point}:{nth}"}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    untouched = shutil.copytree(toy_lab, tmp_path / "lab-as-killed")

    # route 1: check (and repair if it finds anything), then re-run the ingest
    check = rsx(toy_lab, "check")
    if check.exit_code != 0:
        assert "problem:" in check.output
        repair = rsx(toy_lab, "check", "--repair")
        if repair.exit_code != 0:  # the debris is a large share of this small lab: held back
            assert "orphan blob(s) left in place" in repair.output, repair.output
            repair = rsx(toy_lab, "check", "--repair", "--force")  # into quarantine
        assert repair.exit_code == 0, repair.output
        again = rsx(toy_lab, "check")
        assert again.exit_code == 0, again.output
    rerun = rsx(toy_lab, "ingest", folder, "--batch-size", BATCH)
    assert rerun.exit_code == 0, rerun.output
    assert_complete(toy_lab, files)

    # route 2: no repair at all, just the same ingest again
    rerun = rsx(untouched, "ingest", folder, "--batch-size", BATCH)
    assert rerun.exit_code == 0, rerun.output
    assert "0 failed" in rerun.stdout
    assert_complete(untouched, files)


def test_crash_points_are_inert_without_the_variable(monkeypatch):
    from resynth_index.store import faults

    monkeypatch.delenv(CRASH_ENV, raising=False)
    for point in faults.POINTS:
        faults.crash_point(point)  # returns: the process is still here
    monkeypatch.setenv(CRASH_ENV, "index-save:3")
    monkeypatch.setattr(faults, "_reached", {})
    faults.crash_point("blob-write")  # another point: not counted
    assert faults._reached == {}
