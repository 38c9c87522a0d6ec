"""Content-addressed blob store: round trips, idempotence, verification, crash leftovers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from resynth_index.errors import StoreError
from resynth_index.store.blobs import BlobStore


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def test_put_read_verify_round_trip(store: BlobStore) -> None:
    data = b"\x89PNG pretend image bytes"
    sha = _sha(data)
    path = store.put(sha, data)
    assert path == store.path_for(sha)
    assert path.relative_to(store.root).as_posix() == store.relpath_for(sha)
    assert store.relpath_for(sha) == f"{sha[:2]}/{sha[2:4]}/{sha}"
    assert store.exists(sha)
    assert store.read(sha) == data
    assert store.verify(sha) is None
    assert list(store.iter_shas()) == [sha]


def test_put_is_idempotent(store: BlobStore) -> None:
    data = b"same bytes twice"
    sha = _sha(data)
    first = store.put(sha, data)
    modified = first.stat().st_mtime_ns
    second = store.put(sha, data)
    assert first == second
    assert second.stat().st_mtime_ns == modified  # not rewritten
    assert list(store.iter_shas()) == [sha]
    assert not [p for p in store.root.rglob("*") if p.is_file() and p.name != sha]


def test_put_rejects_bytes_that_do_not_match_the_hash(store: BlobStore) -> None:
    sha = _sha(b"what was promised")
    with pytest.raises(StoreError, match=sha):
        store.put(sha, b"something else")
    assert not store.exists(sha)
    assert list(store.iter_shas()) == []


@pytest.mark.parametrize(
    "bad", ["", "abc", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "a" * 64 + "\n", "../" + "a" * 61]
)
def test_malformed_hashes_are_rejected(store: BlobStore, bad: str) -> None:
    with pytest.raises(StoreError):
        store.path_for(bad)
    with pytest.raises(StoreError):
        store.put(bad, b"x")


def test_verify_detects_missing_and_altered_blobs(store: BlobStore) -> None:
    data = b"original"
    sha = _sha(data)
    assert store.verify(sha) == "missing"
    path = store.put(sha, data)
    path.write_bytes(b"tampered")
    assert store.verify(sha) == "hash mismatch"
    path.unlink()
    assert store.verify(sha) == "missing"
    assert not store.exists(sha)


def test_put_repairs_an_altered_blob(store: BlobStore) -> None:
    data = b"good copy"
    sha = _sha(data)
    store.put(sha, data).write_bytes(b"bad copy!")
    store.put(sha, data)
    assert store.verify(sha) is None
    assert store.read(sha) == data


def test_read_missing_blob_is_a_store_error(store: BlobStore) -> None:
    with pytest.raises(StoreError, match="missing"):
        store.read(_sha(b"never stored"))


def test_iter_shas_lists_every_blob_and_nothing_else(store: BlobStore) -> None:
    blobs = [f"blob {index}".encode() for index in range(20)]
    for data in blobs:
        store.put(_sha(data), data)
    (store.root / "README").write_text("not a blob")
    misplaced = _sha(b"misplaced")
    (store.root / "00" / "00").mkdir(parents=True, exist_ok=True)
    (store.root / "00" / "00" / misplaced).write_bytes(b"misplaced")
    assert sorted(store.iter_shas()) == sorted(_sha(data) for data in blobs)


def test_iter_shas_on_a_store_not_created_yet(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "absent")
    assert list(store.iter_shas()) == []
    assert store.remove_temp_files() == 0


def test_remove_temp_files_after_a_crash(store: BlobStore) -> None:
    data = b"kept"
    sha = _sha(data)
    store.put(sha, data)
    leftover = store.path_for(sha).parent / ".tmp-deadbeef-000000"
    leftover.write_bytes(b"half written")
    assert store.remove_temp_files() == 1
    assert not leftover.exists()
    assert store.read(sha) == data
    assert store.remove_temp_files() == 0


def test_large_blob_round_trip(store: BlobStore) -> None:
    data = bytes(range(256)) * 20_000  # 5 MB
    sha = _sha(data)
    store.put(sha, data)
    assert store.read(sha) == data
    assert store.verify(sha) is None


def _count_directory_fsyncs(monkeypatch) -> list[Path]:
    from resynth_index.store import durable

    fsynced: list[Path] = []
    real = durable.fsync_directory
    monkeypatch.setattr(durable, "fsync_directory", lambda d: (fsynced.append(d), real(d)))
    return fsynced


def test_write_defers_directory_fsyncs_to_one_sync_per_directory(
    store: BlobStore, monkeypatch
) -> None:
    fsynced = _count_directory_fsyncs(monkeypatch)
    blobs = [bytes([n]) * 100 for n in range(5)]
    written = [store.write(_sha(data), data) for data in blobs]
    assert fsynced == []  # in place, bytes on the disk, entries not yet synced
    assert all(store.verify(_sha(data)) is None for data in blobs)
    directories = [d for w in written for d in w.directories]
    # each blob's directory, and the parents of the directories it created (the root's too)
    assert {store.path_for(_sha(data)).parent for data in blobs} <= set(directories)
    assert store.root.parent in directories
    assert store.sync(directories + directories) == len(set(directories))
    assert sorted(fsynced) == sorted(set(directories))  # each distinct directory once


def test_put_is_durable_on_its_own(store: BlobStore, monkeypatch) -> None:
    fsynced = _count_directory_fsyncs(monkeypatch)
    data = b"one blob"
    path = store.put(_sha(data), data)
    assert path.parent in fsynced and path.parent.parent in fsynced  # rename and new directory
    fsynced.clear()
    assert store.write(_sha(data), data).directories == (path.parent,)  # found intact
    store.put(_sha(data), data)
    assert fsynced == [path.parent]  # another writer's rename may not be synced yet
