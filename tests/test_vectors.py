"""The FAISS vector index: gathering by id, persistence, catch-up, repair, checks."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resynth_index.errors import StoreError
from resynth_index.store.vectors import MAGIC, MissingVectorsError, VectorIndex

FP = "f" * 64
DIM = 8


class FakeDB:
    """Stands in for the database: rows in id order, and a record of every after_id asked for."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, batch: int = 7) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.batch = batch
        self.calls: list[int] = []

    def __call__(self, after_id: int):
        self.calls.append(after_id)
        keep = self.ids > after_id
        ids, vectors = self.ids[keep], self.vectors[keep]
        for start in range(0, len(ids), self.batch):
            yield ids[start : start + self.batch], vectors[start : start + self.batch]

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def max_id(self) -> int:
        return int(self.ids[-1]) if len(self.ids) else -1

    def upto(self, n: int) -> FakeDB:
        return FakeDB(self.ids[:n], self.vectors[:n], self.batch)


def random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sorted, unique, non-contiguous int64 ids with varied low bits, some very large."""
    pool = rng.choice(2**40, size=n, replace=False).astype(np.int64)
    pool[: n // 4] = rng.choice(10_000, size=n // 4, replace=False)
    return np.unique(pool) if len(np.unique(pool)) == n else random_ids(rng, n)


def exact_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """Vectors whose inner products are exact in float32 (quarter integers), so ties are real."""
    return (rng.integers(-2, 3, size=(n, dim)) * 0.25).astype(np.float32)


def make_db(seed: int = 0, n: int = 40) -> FakeDB:
    rng = np.random.default_rng(seed)
    return FakeDB(random_ids(rng, n), exact_vectors(rng, n))


# --- reading and adding ----------------------------------------------------------------------


def test_vectors_for_returns_stored_rows_in_asked_order(tmp_path):
    db = make_db()
    index = VectorIndex(tmp_path / "v.faiss", FP, DIM)
    index.add(db.ids, db.vectors)
    pick = np.array([7, 0, 3])
    np.testing.assert_array_equal(index.vectors_for(db.ids[pick]), db.vectors[pick])
    with pytest.raises(MissingVectorsError) as caught:
        index.vectors_for(np.array([db.ids[0], -5]))
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, StoreError)
    assert caught.value.missing == [-5] and "-5" in str(caught.value)


def test_add_refuses_ids_at_or_below_the_watermark(tmp_path):
    db = make_db()
    index = VectorIndex(tmp_path / "a.faiss", FP, DIM)
    index.add(db.ids[:10], db.vectors[:10])
    with pytest.raises(StoreError):
        index.add(db.ids[9:12], db.vectors[9:12])
    with pytest.raises(StoreError):
        index.add(db.ids[[12, 11]], db.vectors[[12, 11]])
    with pytest.raises(StoreError):
        index.add(db.ids[10:12], db.vectors[10:12, :4])
    assert index.count == 10 and index.watermark == db.ids[9]


# --- persistence and catch-up ----------------------------------------------------------------


def open_index(path: Path, db: FakeDB) -> VectorIndex:
    return VectorIndex.open(path, FP, DIM, db, db_count=db.count, db_max_id=db.max_id)


def assert_matches(index: VectorIndex, db: FakeDB) -> None:
    assert index.count == db.count and index.watermark == db.max_id
    np.testing.assert_array_equal(index.vectors_for(db.ids), db.vectors)


def test_save_then_open_round_trip(tmp_path):
    path = tmp_path / "index" / "r.faiss"
    db = make_db()
    built = VectorIndex.rebuild(path, FP, DIM, db)
    assert db.calls == [-1] and path.exists()
    again = FakeDB(db.ids, db.vectors)
    loaded = open_index(path, again)
    assert again.calls == [db.max_id]  # nothing rebuilt, only asked for newer rows
    assert_matches(loaded, db)
    np.testing.assert_array_equal(loaded.vectors_for(db.ids), built.vectors_for(db.ids))


def test_open_catches_up_reading_only_new_rows(tmp_path):
    path = tmp_path / "c.faiss"
    db = make_db(n=40)
    VectorIndex.rebuild(path, FP, DIM, db.upto(25))
    before = path.read_bytes()
    index = open_index(path, db)
    assert db.calls == [int(db.ids[24])]
    assert_matches(index, db)
    assert path.read_bytes() != before  # saved after catching up
    later = FakeDB(db.ids, db.vectors)
    assert_matches(open_index(path, later), db)
    assert later.calls == [db.max_id]


def test_open_without_changes_does_not_rewrite(tmp_path):
    path = tmp_path / "s.faiss"
    db = make_db()
    VectorIndex.rebuild(path, FP, DIM, db)
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))
    open_index(path, FakeDB(db.ids, db.vectors))
    assert path.stat().st_mtime_ns == stamp - 10**9


def rewrite_header(path: Path, **changes) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    header = json.loads(data[start : start + length])
    header.update(changes)
    text = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(text)) + text + data[start + length :])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-50])


def garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(5).bytes(3000))


def flipped_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        truncate,
        garbage,
        flipped_byte,
        lambda p: p.unlink(),
        lambda p: p.write_bytes(b""),
        lambda p: rewrite_header(p, count=39),
        lambda p: rewrite_header(p, watermark=1),
        lambda p: rewrite_header(p, fingerprint="0" * 64),
        lambda p: rewrite_header(p, checksum="nope"),
    ],
    ids=[
        "truncated",
        "garbage",
        "flipped",
        "missing",
        "empty",
        "count",
        "watermark",
        "foreign",
        "checksum",
    ],
)
def test_damaged_file_is_rebuilt(tmp_path, damage):
    path = tmp_path / "d.faiss"
    db = make_db(n=40)
    VectorIndex.rebuild(path, FP, DIM, db)
    damage(path)
    fresh = FakeDB(db.ids, db.vectors)
    index = open_index(path, fresh)
    assert fresh.calls == [-1]
    assert_matches(index, db)
    assert VectorIndex(path, FP, DIM).check(db.count, db.max_id).ok


def test_deleted_rows_and_future_file_force_a_rebuild(tmp_path):
    path = tmp_path / "f.faiss"
    db = make_db(n=40)
    VectorIndex.rebuild(path, FP, DIM, db)
    keep = np.ones(40, dtype=bool)
    keep[[3, 17]] = False  # rows deleted in the middle: counts disagree after catching up
    thinner = FakeDB(db.ids[keep], db.vectors[keep])
    assert_matches(open_index(path, thinner), thinner)
    assert thinner.calls == [db.max_id, -1]
    VectorIndex.rebuild(path, FP, DIM, db)
    older = db.upto(30)  # the file is ahead of the database
    assert_matches(open_index(path, older), older)
    assert older.calls == [older.max_id, -1]  # rows stored since it counted? none: rebuilt


def test_leftover_temp_files_are_ignored_and_removed(tmp_path):
    path = tmp_path / "t.faiss"
    db = make_db()
    VectorIndex.rebuild(path, FP, DIM, db)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    leftovers = [
        path.with_name(f"{path.name}.tmp-{os.getpid()}"),
        path.with_name(f"{path.name}.tmp-{dead}"),
        path.with_name(f"{path.name}.tmp-junk"),
    ]
    for leftover in leftovers:
        leftover.write_bytes(MAGIC + b"half-written")
    assert_matches(open_index(path, FakeDB(db.ids, db.vectors)), db)
    assert not any(leftover.exists() for leftover in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_save_failure_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "x.faiss"
    db = make_db(n=40)
    old = db.upto(20)
    index = VectorIndex.rebuild(path, FP, DIM, old)
    before = path.read_bytes()
    index.add(db.ids[20:], db.vectors[20:])

    def crash(src, dst):
        raise OSError("disk pulled out")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="x.faiss"):
        index.save()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    reopened = FakeDB(old.ids, old.vectors)
    assert_matches(open_index(path, reopened), old)
    assert reopened.calls == [old.max_id]


# --- check -----------------------------------------------------------------------------------


def test_check_reports_each_problem_without_repairing(tmp_path):
    path = tmp_path / "k.faiss"
    db = make_db(n=40)
    index = VectorIndex(path, FP, DIM)
    assert index.check(db.count, db.max_id).problems == ["index file missing"]
    VectorIndex.rebuild(path, FP, DIM, db.upto(30))
    before = path.read_bytes()
    health = index.check(db.count, db.max_id)
    assert not health.ok
    assert health.problems == [
        f"index holds 30 vectors, database {db.count}",
        f"index watermark {db.ids[29]} behind database {db.max_id}",
    ]
    health = index.check(30, int(db.ids[10]))
    assert health.problems == [f"index watermark {db.ids[29]} ahead of database {db.ids[10]}"]
    assert index.check(30, int(db.ids[29])).ok
    ids_health = index.check(30, int(db.ids[29]), lambda: np.append(db.ids[1:30], 123456789))
    assert ids_health.problems == [
        "1 database embedding(s) missing from the index (first: 123456789)",
        f"1 index id(s) not in the database (first: {db.ids[0]})",
    ]
    other = VectorIndex(path, "a" * 64, DIM).check(30, int(db.ids[29]))
    assert other.problems == [f"index was built by embedder {FP[:12]}, the lab uses {'a' * 12}"]
    truncate(path)
    damaged = index.check(30, int(db.ids[29]))
    assert len(damaged.problems) == 1 and damaged.problems[0].startswith("index file unreadable")
    assert path.read_bytes() == before[:-50]  # nothing repaired


def test_import_does_not_load_faiss():
    code = (
        "import sys, resynth_index.store.vectors; "
        "print('faiss' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"]
