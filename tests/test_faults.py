"""Faults of the store in the middle of a command: one line, exit 1, nothing lost, then a rerun.

Each fault is real: a PostgreSQL server stopped while a command holds its connection, a full
filesystem under the SQLite file, a read-only mount, a damaged database file, a settings file
that is not a lab's. A command meets the fault at a chosen step (``RSX_HOLD_AT``, see
resynth_index/store/faults.py: the process waits there while the test breaks something), and
the checks are the same for every fault: exit status 1, exactly one line on stderr and no
traceback, no blob or row lost or doubled, and once the fault is repaired the same command
completes and ``rsx check`` is clean.

The filesystem faults mount a tmpfs or a read-only bind mount, which needs root (CI runs as
root); elsewhere those tests are skipped, or fail under ``RSX_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile_files import file_sha, good_images, index_problems, rsx_process, store_state
from postgres import (
    find_pg_bin,
    postgres_missing,
    start_again,
    start_postgres,
    stop_now,
    stop_postgres,
    toy_lab_on,
    wait_until,
)
from services import require_service

from resynth_index.config import DATABASE_FILE, SETTINGS_FILE
from resynth_index.store.faults import HOLD_ENV

pytestmark = pytest.mark.slow  # real processes meeting real faults


# ---------------------------------------------------------------- what every fault must show
#: Lines a command prints on stderr before its work, whatever happens next (``rsx query``
#: announces what it will generate): not part of how a failure is told.
ANNOUNCEMENTS = ("planning ",)


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed on stderr (asserting exit 1 and no traceback)."""
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith(ANNOUNCEMENTS)
    ]
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


@dataclass(frozen=True)
class Holdings:
    """What a lab holds: every image's SHA-256, every blob on disk, and row counts."""

    images: frozenset[str]
    blobs: frozenset[str]
    embeddings: int
    queries: int

    @classmethod
    def of(cls, lab: Path) -> Holdings:
        state = store_state(lab)
        return cls(frozenset(state.images), frozenset(state.blobs), state.embeddings, state.queries)


def blob_files(lab: Path) -> set[str]:
    """The blob files on disk, read without opening the lab (whose database may be gone)."""
    return {p.name for p in (lab / "blobs").glob("*/*/*") if len(p.name) == 64}


def assert_clean(lab: Path) -> None:
    synced = rsx_process(lab, "index", "sync")
    assert synced.returncode == 0, synced.stderr
    assert index_problems(lab) == []
    check = rsx_process(lab, "check")
    assert check.returncode == 0, check.stdout + check.stderr


@contextmanager
def held(lab: Path, *args: str, point: str, nth: int, marker: Path) -> Iterator[dict]:
    """Run ``rsx --lab LAB ARGS``, held the ``nth`` time it reaches crash point ``point`` while
    the block runs (the test breaks something there); afterwards ``outcome["result"]`` is the
    finished process (stdout, stderr, returncode)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", HOLD_ENV: f"{point}:{nth}:{marker}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "resynth_index", "--lab", str(lab), *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    outcome: dict = {}
    try:
        wait_until(
            lambda: marker.exists() or process.poll() is not None,
            timeout=240,
            what=f"rsx {args[0]} to reach {point} #{nth}",
        )
        assert marker.exists(), f"finished before {point} #{nth}: {process.communicate()}"
        yield outcome
    finally:
        marker.unlink(missing_ok=True)
        stdout, stderr = process.communicate(timeout=300)
        outcome["result"] = subprocess.CompletedProcess(
            process.args, process.returncode, stdout, stderr
        )


# ---------------------------------------------------------------- a lab that lost its database
@pytest.fixture
def evidence(toy_lab: Path, tmp_path: Path) -> list[Path]:
    """Three images ingested into the toy lab, its index synced: the evidence to keep."""
    files = good_images(tmp_path / "incoming", 3)
    stored = rsx_process(toy_lab, "ingest", str(tmp_path / "incoming"))
    assert stored.returncode == 0, stored.stderr
    return files


LAB_COMMANDS = [
    ("check",),
    ("check", "--repair"),
    ("check", "--repair", "--force"),
    ("info",),
    ("history",),
    ("generator", "list"),
    ("index", "sync"),
]


@pytest.mark.parametrize("loss", ["missing", "empty"])
def test_a_lab_whose_sqlite_file_is_gone_is_refused_and_keeps_its_evidence(
    toy_lab, evidence, tmp_path, loss
):
    database = toy_lab / DATABASE_FILE
    backup = tmp_path / "backup.sqlite"
    shutil.copy2(database, backup)
    blobs = blob_files(toy_lab)
    assert len(blobs) == 3
    if loss == "missing":
        database.unlink()
    else:
        database.write_bytes(b"")
    for args in [*LAB_COMMANDS, ("ingest", str(evidence[0])), ("query", str(evidence[0]))]:
        line = one_line_failure(rsx_process(toy_lab, *args))
        assert f"{database} is {loss}" in line and "restore lab.sqlite" in line, (args, line)
        assert blob_files(toy_lab) == blobs, args  # nothing moved, nothing deleted
        assert database.exists() == (loss == "empty")  # never made anew
        assert not (toy_lab / "quarantine").exists()
    shutil.copy2(backup, database)  # the restore the message asks for
    assert Holdings.of(toy_lab).images == {file_sha(p) for p in evidence}
    assert_clean(toy_lab)


@pytest.fixture(scope="module")
def fault_server():
    """A PostgreSQL server of this module's own, which its tests stop and start again."""
    reason = postgres_missing()
    require_service("postgresql", reason is None, reason or "")
    bin_dir = find_pg_bin()
    assert bin_dir is not None
    server = start_postgres(bin_dir, durable=True)  # what committed must survive a stop
    try:
        yield server
    finally:
        stop_postgres(server)


@pytest.fixture
def pg_lab(fault_server, toy_lab_template, tmp_path) -> Path:
    root = tmp_path / "pg-lab"
    database = toy_lab_on(fault_server, toy_lab_template, root)
    yield root
    fault_server.drop_database(database)


def test_a_lab_pointed_at_an_empty_postgresql_database_is_refused(fault_server, pg_lab, tmp_path):
    from postgres import _point_at

    from resynth_index.config import LabSettings

    good_images(tmp_path / "incoming", 3)
    assert rsx_process(pg_lab, "ingest", str(tmp_path / "incoming")).returncode == 0
    right = LabSettings.load(pg_lab).database_url
    before = Holdings.of(pg_lab)
    empty = fault_server.create_database()  # a typo in the URL names another database
    try:
        _point_at(pg_lab, fault_server.url(empty))
        for args in LAB_COMMANDS:
            line = one_line_failure(rsx_process(pg_lab, *args))
            assert "holds no rsx lab (no schema)" in line and "check the database URL" in line
        with fault_server.connect(empty) as connection:
            tables = connection.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchone()[0]
        assert tables == 0  # no schema was made there
        assert blob_files(pg_lab) == set(before.blobs)
    finally:
        fault_server.drop_database(empty)
    _point_at(pg_lab, right)
    assert Holdings.of(pg_lab) == before
    assert_clean(pg_lab)


def test_repair_after_an_old_database_was_restored_quarantines_only_when_forced(toy_lab, tmp_path):
    """The database put back from an older backup: the blobs stored since look like orphans and
    the index remembers vectors the database lacks. A repair leaves them where they are; with
    --force it moves them to the quarantine (never deletes); restoring the newest database
    brings them back; --purge-quarantine alone deletes."""
    first = good_images(tmp_path / "first", 2, seed=10)
    later = good_images(tmp_path / "later", 2, seed=20)
    assert rsx_process(toy_lab, "ingest", str(tmp_path / "first")).returncode == 0
    old = tmp_path / "old.sqlite"
    shutil.copy2(toy_lab / DATABASE_FILE, old)
    assert rsx_process(toy_lab, "ingest", str(tmp_path / "later")).returncode == 0
    newest = tmp_path / "newest.sqlite"
    shutil.copy2(toy_lab / DATABASE_FILE, newest)
    shutil.copy2(old, toy_lab / DATABASE_FILE)
    blobs = blob_files(toy_lab)
    assert len(blobs) == 4

    check = rsx_process(toy_lab, "check")
    assert check.returncode == 1
    assert "2 index id(s) not in the database" in check.stdout
    assert "--repair  (" not in check.stdout  # no repair is offered for what it would harm
    repair = rsx_process(toy_lab, "check", "--repair")
    assert repair.returncode == 1
    assert "index holds 2 vector(s) the database does not" in repair.stdout
    assert blob_files(toy_lab) == blobs and not (toy_lab / "quarantine").exists()

    forced = rsx_process(toy_lab, "check", "--repair", "--force")
    assert forced.returncode == 0, forced.stdout
    moved = {file_sha(p) for p in later}
    assert blob_files(toy_lab) == blobs - moved
    assert {p.name for p in (toy_lab / "quarantine").glob("*/*/*")} == moved

    shutil.copy2(newest, toy_lab / DATABASE_FILE)  # the newest database after all
    back = rsx_process(toy_lab, "check", "--repair", "--force")
    assert "moved 2 blob(s) back from quarantine" in back.stdout, back.stdout
    assert blob_files(toy_lab) == blobs
    assert Holdings.of(toy_lab).images == {file_sha(p) for p in first + later}
    assert_clean(toy_lab)


# ---------------------------------------------------------------- the server stops mid-command
def test_postgresql_stopped_during_an_ingest(fault_server, pg_lab, tmp_path):
    files = good_images(tmp_path / "incoming", 6)
    folder = str(tmp_path / "incoming")
    args = ("ingest", folder, "--batch-size", "2", "--workers", "0")
    marker = tmp_path / "held"
    with held(pg_lab, *args, point="image-row", nth=3, marker=marker) as outcome:
        stop_now(fault_server)  # batch 1 committed; batch 2's blobs placed, its rows not yet
    try:
        line = one_line_failure(outcome["result"])
    finally:
        start_again(fault_server)
    assert "could not be reached" in line and "then rerun the command" in line, line
    assert "SELECT" not in line and "INSERT" not in line
    first = {file_sha(p) for p in files[:2]}
    assert Holdings.of(pg_lab).images == first  # the committed batch, whole; nothing else
    rerun = rsx_process(pg_lab, *args)
    assert rerun.returncode == 0, rerun.stderr
    after = Holdings.of(pg_lab)
    assert after.images == {file_sha(p) for p in files} and after.embeddings == 6
    assert_clean(pg_lab)


def test_postgresql_stopped_during_a_query(fault_server, pg_lab, tmp_path):
    [image] = good_images(tmp_path / "q", 1, seed=77)
    args = ("query", str(image), "--caption", "a lighthouse", "--candidates", "toy-a,toy-b")
    marker = tmp_path / "held"
    # image-row #1: the query image; #2: the first resynthesis, generated and being stored
    with held(pg_lab, *args, point="image-row", nth=2, marker=marker) as outcome:
        stop_now(fault_server)
    try:
        line = one_line_failure(outcome["result"])
    finally:
        start_again(fault_server)
    assert "could not be reached" in line, line
    assert Holdings.of(pg_lab).queries == 0  # no answer was recorded
    rerun = rsx_process(pg_lab, *args, "--json")
    assert rerun.returncode == 0, rerun.stderr
    after = Holdings.of(pg_lab)
    assert after.queries == 1 and len(after.images) == 3  # the query and two resyntheses, once
    assert_clean(pg_lab)


# ---------------------------------------------------------------- filesystems that refuse
def _require_root_mounts() -> None:
    require_service(
        "mounts",
        os.geteuid() == 0 and shutil.which("mount") is not None,
        "mounting a small tmpfs or a read-only bind mount needs root (CI runs as root)",
    )


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 192 MiB tmpfs (the toy lab takes about 55), mounted for the test and unmounted after."""
    _require_root_mounts()
    where = Path(tempfile.mkdtemp(prefix="rsx-small-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=192m", "tmpfs", str(where)], capture_output=True
    )
    require_service("a tmpfs mount", mounted.returncode == 0, mounted.stderr.decode().strip())
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file (returned, to be removed)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):  # unbuffered: each refusal is met here, at once
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def test_disk_full_under_the_database_during_an_ingest(toy_lab, small_disk, tmp_path):
    lab = shutil.copytree(toy_lab, small_disk / "lab")
    files = good_images(tmp_path / "incoming", 6)
    args = ("ingest", str(tmp_path / "incoming"), "--batch-size", "2", "--workers", "0")
    with held(lab, *args, point="image-row", nth=3, marker=tmp_path / "held") as outcome:
        filler = fill(small_disk)  # batch 2's blobs are in place, its rows not yet
    line = one_line_failure(outcome["result"])
    filler.unlink()
    assert "could not be written" in line and "free disk space" in line, line
    assert Holdings.of(lab).images == {file_sha(p) for p in files[:2]}
    rerun = rsx_process(lab, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert Holdings.of(lab).images == {file_sha(p) for p in files}
    assert_clean(lab)


def read_only(lab: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``rsx --lab LAB ARGS`` with LAB mounted read-only for that process alone (a bind mount
    in a mount namespace of its own: root gets EROFS too, as on a read-only share)."""
    _require_root_mounts()
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    command = [
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "rsx", str(lab),
        sys.executable, "-m", "resynth_index", "--lab", str(lab), *args,
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def test_a_read_only_lab_refuses_writes_in_one_line(toy_lab, evidence, tmp_path):
    probe = read_only(toy_lab, "--version")
    require_service("a read-only bind mount", probe.returncode == 0, probe.stderr.strip())
    before = Holdings.of(toy_lab)
    settings = (toy_lab / SETTINGS_FILE).read_bytes()
    [image] = good_images(tmp_path / "q", 1, seed=55)
    for args in [
        ("query", str(image), "--caption", "a cat", "--candidates", "toy-a"),
        ("config", "set", "threshold", "0.3"),
        ("generator", "add", "toy-d", "--toy", "44"),
        ("ingest", str(image)),
    ]:
        line = one_line_failure(read_only(toy_lab, *args))
        assert "read-only" in line.lower(), (args, line)
    assert Holdings.of(toy_lab) == before
    assert (toy_lab / SETTINGS_FILE).read_bytes() == settings
    assert_clean(toy_lab)


# ---------------------------------------------------------------- damaged files
EVERY_COMMAND = [
    *LAB_COMMANDS,
    ("query", "IMAGE", "--no-generate"),
    ("ingest", "IMAGE"),
    ("show", "1"),
    ("config", "set", "default_candidates", "toy-a"),
    ("generator", "add", "toy-d", "--imported"),
    ("generator", "remove", "toy-a"),
    ("export-prompts",),
    ("calibrate", "--no-generate"),
    ("resynthesize", "--captions", "CAPTIONS"),
    ("eval", "--shots", "1"),
]


def test_a_corrupt_database_is_named_by_every_command(toy_lab, evidence, tmp_path):
    database = toy_lab / DATABASE_FILE
    intact = database.read_bytes()
    damaged = bytearray(intact)
    damaged[4096:8192] = b"\xff" * 4096  # the second page: a table's root
    database.write_bytes(bytes(damaged))
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\n", encoding="utf-8")
    blobs = blob_files(toy_lab)
    for args in EVERY_COMMAND:
        args = tuple({"IMAGE": str(evidence[0]), "CAPTIONS": str(captions)}.get(a, a) for a in args)
        line = one_line_failure(rsx_process(toy_lab, *args))
        assert "is corrupt" in line and "restore it from a backup" in line, (args, line)
    assert blob_files(toy_lab) == blobs
    # what only reads or writes the settings file does not need the database
    assert rsx_process(toy_lab, "config", "get", "threshold").returncode == 0
    database.write_bytes(intact)
    assert_clean(toy_lab)


def test_check_finds_damage_that_opening_does_not_meet(toy_lab, evidence):
    """A damaged page deep in a table: the lab opens, and `rsx check` says the database is
    corrupt and how to restore it, rather than judging blobs against it."""
    import sqlite3

    database = toy_lab / DATABASE_FILE
    intact = database.read_bytes()
    with sqlite3.connect(database) as connection:
        [(root,)] = connection.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'embeddings'"
        ).fetchall()
    page = 4096
    damaged = bytearray(intact)
    damaged[(root - 1) * page + 8 : root * page] = b"\x07" * (page - 8)
    database.write_bytes(bytes(damaged))
    check = rsx_process(toy_lab, "check", "--repair")
    assert check.returncode == 1
    assert "problem: the database is corrupt" in check.stdout, check.stdout + check.stderr
    assert "restore the lab's database from a backup" in check.stdout
    assert "orphan" not in check.stdout and not (toy_lab / "quarantine").exists()
    database.write_bytes(intact)
    assert_clean(toy_lab)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("[1, 2, 3]", "not a JSON object"),
        ("{}", "lacks embedder, embedder_fingerprint, embedder_dim"),
        ("VERSION 99", "settings version 99, newer than this rsx reads"),
        ("VERSION 0", "unknown settings version 0"),
        ('{"embedder": ', "cannot read"),
    ],
)
def test_a_settings_file_that_is_not_a_lab_s_is_refused(toy_lab, content, said):
    import json

    path = toy_lab / SETTINGS_FILE
    kept = path.read_text(encoding="utf-8")
    if content.startswith("VERSION"):
        settings = json.loads(kept)
        settings["version"] = int(content.split()[1])
        content = json.dumps(settings)
    path.write_text(content, encoding="utf-8")
    for args in [("info",), ("check",), ("config", "get")]:
        line = one_line_failure(rsx_process(toy_lab, *args))
        assert said in line, line
    path.write_text(kept, encoding="utf-8")
    assert rsx_process(toy_lab, "check").returncode == 0


def test_init_under_a_regular_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder", encoding="utf-8")
    for lab in (afile, afile / "lab"):
        line = one_line_failure(rsx_process(lab, "init"))
        assert "is a file" in line, line
    assert afile.read_text(encoding="utf-8") == "not a folder"
