"""The lab remembers file digests: a new process re-reads neither unchanged weights nor images.

``store/digests.py`` keeps each file's SHA-256 keyed by (real path, device, inode, size, mtime,
ctime); generator fingerprints ask it through ``hashing.FileDigests`` and ingest skips files whose
stat still matches and whose image and role are stored. Every file a test expects to be remembered
is first given an mtime an hour back: a file modified within ``RACY_WINDOW_NS`` of being read is
never remembered (``test_a_freshly_written_file_is_read_every_time``).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hostile_files import good_images, noise, rsx, store_state
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from resynth_index import hashing
from resynth_index.errors import StoreError
from resynth_index.hashing import file_stat
from resynth_index.lab import Lab
from resynth_index.models.generators import diffusers
from resynth_index.models.generators.diffusers import weights_fingerprint
from resynth_index.pipeline import ingest as ingest_module
from resynth_index.store import digests, migrate
from resynth_index.store.digests import StoredDigests
from resynth_index.store.engine import make_engine, make_sessionmaker
from resynth_index.store.models import FileDigestRow

HOUR_NS = 3600 * 10**9


def age(*paths: Path, hours: float = 1.0) -> int:
    """Give the files an mtime ``hours`` back (a file is remembered only once it has settled)."""
    when = time.time_ns() - int(hours * HOUR_NS)
    for path in paths:
        os.utime(path, ns=(when, when), follow_symlinks=True)
    return when


def new_process() -> None:
    """What a new ``rsx`` process starts with: no digest remembered in memory."""
    diffusers._file_digests.clear()


def pipeline_folder(root: Path, weights: bytes = b"w" * 4096) -> Path:
    """A folder weights_fingerprint accepts (it hashes files; it loads nothing), aged."""
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (root / "unet" / "config.json").write_text('{"sample_size": 8}')
    (root / "unet" / "model.safetensors").write_bytes(weights)
    age(*[p for p in root.rglob("*") if p.is_file()])
    return root


def rows(memory: StoredDigests) -> dict[str, str]:
    with make_sessionmaker(memory._engine).begin() as session:
        return dict(session.execute(select(FileDigestRow.path, FileDigestRow.sha256)).all())


# --------------------------------------------------------------------------- generator weights
def test_a_second_process_reads_no_weight_file_and_a_changed_one_alone(toy_lab, files_hashed):
    folder = toy_lab / "models" / "toy-toy-a"
    files = diffusers._folder_files(folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    age(*files)

    def open_generator() -> str:
        new_process()
        with Lab.open(toy_lab) as lab:
            row = next(r for r in lab.generators() if r.name == "toy-a")
            return lab.generator_model(row).fingerprint

    registered = open_generator()  # the first process reads every file, and remembers them
    assert sorted(files_hashed) == sorted(os.path.realpath(f) for f in files)

    files_hashed.clear()
    assert open_generator() == registered
    assert files_hashed == []  # the second reads none

    age(weights, hours=2)  # touched: same bytes, another mtime
    files_hashed.clear()
    assert open_generator() == registered
    assert files_hashed == [str(weights.resolve())]

    when = file_stat(weights).mtime_ns  # replaced by a copy: same size, same mtime, new inode
    copy = weights.with_name("copy")
    shutil.copyfile(weights, copy)
    os.replace(copy, weights)
    os.utime(weights, ns=(when, when))
    files_hashed.clear()
    assert open_generator() == registered
    assert files_hashed == [str(weights.resolve())]

    data = bytearray(weights.read_bytes())  # replaced by other bytes of the same size and mtime
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    os.replace(copy, weights)
    os.utime(weights, ns=(when, when))
    files_hashed.clear()
    with pytest.raises(StoreError, match="no longer matches"):
        open_generator()
    assert files_hashed == [str(weights.resolve())]


def test_a_link_repointed_to_a_file_of_the_same_size_and_time_is_read_again(
    tmp_path, memory, files_hashed
):
    folder = pipeline_folder(tmp_path / "pipe")
    weights = folder / "unet" / "model.safetensors"
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(b"a" * 4096)
    second.write_bytes(b"b" * 4096)
    when = age(first, second)
    weights.unlink()
    weights.symlink_to(first)
    before = weights_fingerprint(folder, digests=memory)
    assert str(first.resolve()) in rows(memory)

    weights.unlink()
    weights.symlink_to(second)  # same size, same mtime: another real path, another inode
    assert file_stat(second).mtime_ns == when
    new_process()
    files_hashed.clear()
    after = weights_fingerprint(folder, digests=memory)
    assert files_hashed == [str(second.resolve())]
    assert after != before
    new_process()
    assert after == weights_fingerprint(folder)  # what hashing every file gives


def test_a_wrong_row_for_a_changed_stat_cannot_give_a_wrong_fingerprint(
    tmp_path, memory, files_hashed
):
    folder = pipeline_folder(tmp_path / "pipe")
    weights = folder / "unet" / "model.safetensors"
    truth = weights_fingerprint(folder)
    new_process()
    assert weights_fingerprint(folder, digests=memory) == truth
    real = str(weights.resolve())
    sessions = make_sessionmaker(memory._engine)
    bogus = "0" * 64
    stat = file_stat(weights)
    for changed in (
        {"mtime_ns": stat.mtime_ns - 1},
        {"inode": stat.inode + 1},
        {"device": stat.device + 1},
        {"size_bytes": stat.size + 1},
        {"ctime_ns": stat.ctime_ns + 1},
    ):
        with sessions.begin() as session:  # a row that lies, for another version of the file
            session.execute(
                update(FileDigestRow)
                .where(FileDigestRow.path == real)
                .values(sha256=bogus, **changed)
            )
        new_process()
        files_hashed.clear()
        assert weights_fingerprint(folder, digests=memory) == truth, changed
        assert files_hashed == [real]
        assert rows(memory)[real] != bogus  # rewritten with the truth

    with sessions.begin() as session:  # a matching row whose digest no writer could have made
        session.execute(
            update(FileDigestRow).where(FileDigestRow.path == real).values(sha256="not a digest")
        )
    new_process()
    files_hashed.clear()
    assert weights_fingerprint(folder, digests=memory) == truth
    assert files_hashed == [real]


def test_a_freshly_written_file_is_read_every_time(tmp_path, memory, files_hashed):
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"x" * 100)
    age(fresh, hours=-0.1)  # modified "now" (or later): the same tick could hide another write
    assert memory.digest(fresh) == memory.digest(fresh) == hashing.hash_bytes(b"x" * 100)
    assert len(files_hashed) == 2 and rows(memory) == {}
    age(fresh)
    memory.digest(fresh)
    memory.digest(fresh)
    assert len(files_hashed) == 3 and list(rows(memory)) == [str(fresh.resolve())]


def test_a_file_changed_while_it_is_read_is_not_remembered(tmp_path, memory, monkeypatch):
    path = tmp_path / "growing.bin"
    path.write_bytes(b"y" * 100)
    age(path)
    real = hashing.hash_file

    def hash_then_append(target):
        digest = real(target)
        with open(target, "ab") as handle:
            handle.write(b"more")
        return digest

    monkeypatch.setattr(hashing, "hash_file", hash_then_append)
    memory.digest(path)
    assert rows(memory) == {}


def test_an_unwritable_or_locked_database_only_costs_a_read(tmp_path, memory, files_hashed):
    folder = pipeline_folder(tmp_path / "pipe")
    truth = weights_fingerprint(folder)
    database = tmp_path / "lab.sqlite"

    read_only = make_engine(f"sqlite:///file:{database}?mode=ro&uri=true")
    new_process()
    assert weights_fingerprint(folder, digests=StoredDigests(read_only)) == truth
    assert rows(memory) == {}
    read_only.dispose()

    locker = sqlite3.connect(database, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        impatient = StoredDigests(memory._engine, write_wait_s=0.2)
        new_process()
        started = time.monotonic()
        assert weights_fingerprint(folder, digests=impatient) == truth
        # one wait for the lock, then no more tries (the writes pause) for the other files
        assert time.monotonic() - started < 2.0
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert rows(memory) == {}
    new_process()
    weights_fingerprint(folder, digests=memory)
    assert len(rows(memory)) == 3


def test_odd_files_are_read_not_remembered(tmp_path, memory):
    stat = file_stat(pipeline_folder(tmp_path / "pipe") / "model_index.json")
    with make_sessionmaker(memory._engine).begin() as session:
        # an inode above 2**63 (overlay filesystems make them) is stored wrapped, and found again
        big_inode = replace(stat, inode=2**64 - 5)
        assert digests.remember(session, [(big_inode, "a" * 64)]) == 1
        assert digests.remembered(session, [big_inode]) == {big_inode: "a" * 64}
        assert digests.remembered(session, [stat]) == {}  # another inode: not this file's
        too_big = replace(stat, mtime_ns=2**70, path="/x")
        not_utf8 = replace(stat, path="/tmp/\udcff")
        fifo = replace(stat, regular=False, path="/y")
        entries = [(too_big, "b" * 64), (not_utf8, "c" * 64), (fifo, "d" * 64)]
        assert digests.remember(session, entries) == 0


@pytest.mark.slow  # a PostgreSQL server starts for it
def test_the_memory_works_on_both_engines(engine_url, tmp_path, files_hashed):
    """Upserts, 64-bit stats and the short lock wait on SQLite and on PostgreSQL."""
    engine = make_engine(engine_url)
    try:
        migrate.upgrade(engine)
        memory = StoredDigests(engine)
        folder = pipeline_folder(tmp_path / "pipe")
        weights = folder / "unet" / "model.safetensors"
        os.utime(weights, ns=(10**18, 10**18))
        truth = weights_fingerprint(folder)
        files_hashed.clear()
        new_process()
        assert weights_fingerprint(folder, digests=memory) == truth and len(files_hashed) == 3
        new_process()
        assert weights_fingerprint(folder, digests=memory) == truth and len(files_hashed) == 3
        weights.write_bytes(b"v" * 4096)  # rewritten: the row is updated in place
        age(weights)
        new_process()
        changed = weights_fingerprint(folder, digests=memory)
        assert changed != truth and len(files_hashed) == 4
        new_process()
        assert weights_fingerprint(folder, digests=memory) == changed and len(files_hashed) == 4
        stat = file_stat(weights)
        with make_sessionmaker(engine).begin() as session:
            big = replace(stat, inode=2**64 - 1, device=2**63, path="/big")
            assert digests.remember(session, [(big, "e" * 64)]) == 1
        with make_sessionmaker(engine).begin() as session:
            assert digests.remembered(session, [big]) == {big: "e" * 64}
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- ingest
def _reads(monkeypatch) -> list[Path]:
    """Every image file ingest opens from now on."""
    opened: list[Path] = []
    real = ingest_module.load_image_file

    def counting(path, *args, **kwargs):
        opened.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ingest_module, "load_image_file", counting)
    return opened


def test_a_second_ingest_reads_no_unchanged_file_and_a_changed_one_alone(
    toy_lab, tmp_path, monkeypatch
):
    folder = tmp_path / "incoming"
    images = good_images(folder, 3)
    age(*images)
    first = rsx(toy_lab, "ingest", str(folder))
    assert first.exit_code == 0, first.output
    assert "3 added, 0 skipped (already present), 0 failed" in first.output
    assert "unchanged" not in first.output
    before = store_state(toy_lab)

    opened = _reads(monkeypatch)
    again = rsx(toy_lab, "ingest", str(folder))
    assert again.exit_code == 0, again.output
    assert opened == []
    assert (
        "ingest: 0 added, 3 skipped (already present), 0 failed;"
        " 3 unchanged (skipped by size and time)" in again.output
    )
    assert store_state(toy_lab) == before

    noise(48, 48, seed=999).save(images[1])  # one file changed
    age(images[1], hours=0.5)
    third = rsx(toy_lab, "ingest", str(folder))
    assert third.exit_code == 0, third.output
    assert opened == [images[1]]
    assert "1 added, 2 skipped (already present), 0 failed; 2 unchanged" in third.output
    check = rsx(toy_lab, "check")
    assert check.exit_code == 0, check.output


def test_a_file_is_skipped_only_when_its_role_is_stored_as_asked(toy_lab, tmp_path, monkeypatch):
    image, other = good_images(tmp_path / "refs", 2)
    age(image, other)
    (tmp_path / "refs" / "good-1.txt").write_text("a dog on a sofa")  # other's sidecar caption
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    manifest = tmp_path / "m.jsonl"

    def ingest(*lines: dict):
        manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return rsx(toy_lab, "ingest", str(manifest))

    stored = [
        {"path": str(image), "role": "reference", "generator": "toy-a", "caption": "a cat"},
        {"path": str(other), "role": "reference", "generator": "toy-a"},
        {"path": str(image), "role": "resynthesis", "generator": "mj", "caption": "a cat"},
        {"path": str(other), "role": "resynthesis", "generator": "toy-b", "seed": 4},
    ]
    assert "4 added" in ingest(*stored).output

    opened = _reads(monkeypatch)
    assert "0 added, 4 skipped (already present), 0 failed; 4 unchanged" in ingest(*stored).output
    assert opened == []

    asked_otherwise = [
        {"path": str(image), "role": "reference", "generator": "toy-b", "caption": "a cat"},
        {"path": str(image), "role": "reference", "generator": "toy-a", "caption": "a new one"},
        {"path": str(image), "role": "query", "caption": "never seen"},
        {"path": str(other), "role": "resynthesis", "generator": "toy-b", "seed": 5},
        {"path": str(other), "role": "reference", "generator": "toy-a", "caption": "a dog"},
    ]
    for line in asked_otherwise:  # each would write a row: read, and stored as before
        opened.clear()
        result = ingest(line)
        assert opened == [Path(line["path"])], line
        assert "unchanged" not in result.output and "0 failed" in result.output, line
    assert rsx(toy_lab, "check").exit_code == 0


def test_ingest_reads_again_what_it_could_not_remember(toy_lab, tmp_path, monkeypatch):
    folder = tmp_path / "incoming"
    images = good_images(folder, 2)
    age(*images, hours=-0.1)  # as if written just now: within the racy window
    assert rsx(toy_lab, "ingest", str(folder)).exit_code == 0
    opened = _reads(monkeypatch)
    again = rsx(toy_lab, "ingest", str(folder))
    assert "0 added, 2 skipped (already present), 0 failed" in again.output
    assert sorted(opened) == sorted(images) and "unchanged" not in again.output

    age(*images)

    def locked(*args, **kwargs):
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(digests, "remember", locked)  # writing digests fails: the ingest does not
    opened.clear()
    result = rsx(toy_lab, "ingest", str(folder))
    assert result.exit_code == 0, result.output
    assert "0 added, 2 skipped (already present), 0 failed" in result.output
    assert len(opened) == 2
    monkeypatch.undo()
    opened = _reads(monkeypatch)
    assert rsx(toy_lab, "ingest", str(folder)).exit_code == 0  # remembered now
    assert len(opened) == 2
    assert "2 unchanged" in rsx(toy_lab, "ingest", str(folder)).output
    assert len(opened) == 2


def test_a_blob_damaged_since_is_restored_and_rot_needs_reread(toy_lab, tmp_path, monkeypatch):
    """A blob written over since ingest remembered its stat is not trusted: the next ingest reads
    the original and restores it. Bytes that change with no change of stat (simulated here by
    remembering the damaged blob's stat) are for ``rsx check`` to find and ``--reread`` to fix."""
    [image] = good_images(tmp_path / "in", 1)
    age(image)
    assert rsx(toy_lab, "ingest", str(image)).exit_code == 0
    sha = hashing.hash_file(image)
    with Lab.open(toy_lab) as lab:
        blob = lab.blobs.path_for(sha)
    blob.write_bytes(blob.read_bytes()[:-8] + b"tampered")  # same size, written over
    opened = _reads(monkeypatch)

    again = rsx(toy_lab, "ingest", str(image))
    assert again.exit_code == 0 and opened == [image]
    assert "0 added, 1 skipped (already present), 0 failed" in again.output
    assert hashing.hash_file(blob) == sha and rsx(toy_lab, "check").exit_code == 0

    blob.write_bytes(blob.read_bytes()[:-8] + b"bit-rot!")
    with Lab.open(toy_lab) as lab:  # as if its stat had not changed: the memory vouches for it
        assert lab.file_digests.remember([], written=[(file_stat(blob), sha)]) == 1
    opened.clear()
    assert "1 unchanged" in rsx(toy_lab, "ingest", str(image)).output and opened == []
    assert rsx(toy_lab, "check").exit_code == 1
    reread = rsx(toy_lab, "ingest", str(image), "--reread")
    assert reread.exit_code == 0 and opened == [image] and "unchanged" not in reread.output
    assert rsx(toy_lab, "check").exit_code == 0
