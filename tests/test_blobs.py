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


def _record_flushes(monkeypatch) -> list[tuple[str, object]]:
    """Every flush and rename the blob store makes, in order: ("data", temp file), ("dir",
    directory), ("rename", target). Flushes of one batch run side by side, so only the order
    between kinds is fixed, not within one."""
    from resynth_index.store import blobs as blobs_module
    from resynth_index.store import durable

    events: list[tuple[str, object]] = []
    real_data, real_dir = durable.fsync_path_data, durable.fsync_directory
    real_replace = blobs_module.os.replace

    def replace(source, target):
        events.append(("rename", Path(target)))
        return real_replace(source, target)

    monkeypatch.setattr(
        durable, "fsync_path_data", lambda p: (events.append(("data", p)), real_data(p))
    )
    monkeypatch.setattr(
        durable, "fsync_directory", lambda d: (events.append(("dir", d)), real_dir(d))
    )
    monkeypatch.setattr(blobs_module.os, "replace", replace)
    return events


def test_stage_puts_nothing_in_place_and_discard_leaves_nothing(store: BlobStore) -> None:
    data = b"staged, never placed"
    staged = store.stage(_sha(data), data)
    assert staged.temp is not None and staged.temp.read_bytes() == data
    assert not store.exists(_sha(data))  # nothing under the blob's name yet
    assert store.temp_files() == [staged.temp]  # a crash here leaves debris, never a blob
    store.discard([staged])
    assert store.temp_files() == [] and not store.exists(_sha(data))


@pytest.mark.parametrize("count", [1, 5])
def test_bytes_are_flushed_before_the_renames_and_each_directory_once_after(
    store: BlobStore, monkeypatch, count
) -> None:
    events = _record_flushes(monkeypatch)
    blobs = [bytes([n]) * 100 for n in range(count)]
    staged = [store.stage(_sha(data), data) for data in blobs]
    store.place(staged + staged[:1])  # a blob twice in a batch: its directories still once
    kinds = [kind for kind, _ in events]
    assert kinds[:count] == ["data"] * count  # every temp file's bytes, before any rename
    assert {value for kind, value in events if kind == "data"} == {b.temp for b in staged}
    assert kinds[count : 2 * count] == ["rename"] * count
    directories = [value for kind, value in events if kind == "dir"]
    assert kinds[2 * count :] == ["dir"] * len(directories)
    assert len(directories) == len(set(directories))  # each distinct directory once
    for data in blobs:  # the rename's directory, and the parents of the directories made
        path = store.path_for(_sha(data))
        assert {path.parent, path.parent.parent, store.root} <= set(directories)
    assert store.root.parent in directories  # the root itself was made by the first stage


def test_put_is_durable_on_its_own_and_a_blob_found_intact_is_flushed_again(
    store: BlobStore, monkeypatch
) -> None:
    events = _record_flushes(monkeypatch)
    data = b"one blob"
    path = store.put(_sha(data), data)
    assert [kind for kind, _ in events][:2] == ["data", "rename"]
    assert events[1] == ("rename", path) and events[0][1].parent == path.parent  # its temp file
    assert ("dir", path.parent) in events and ("dir", path.parent.parent) in events
    events.clear()
    again = store.stage(_sha(data), data)
    assert again.temp is None and again.directories == (path.parent,)  # found intact
    store.place([again])
    assert events == [("dir", path.parent)]  # another writer's rename may not be synced yet


def test_a_failed_place_leaves_no_temp_files(store: BlobStore, monkeypatch) -> None:
    from resynth_index.store import durable

    blobs = [bytes([n]) * 100 for n in range(3)]
    staged = [store.stage(_sha(data), data) for data in blobs]

    def failing(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "fsync_path_data", failing)
    with pytest.raises(StoreError, match="Input/output error"):
        store.place(staged)
    assert store.temp_files() == []
    assert not any(store.exists(_sha(data)) for data in blobs)  # nothing unflushed in place


def test_the_flushes_of_a_batch_run_side_by_side(store: BlobStore, monkeypatch) -> None:
    """Two flushes meet at a barrier: run one after the other, the first would wait alone."""
    import threading

    from resynth_index.store import durable

    barrier = threading.Barrier(2, timeout=10)
    real = durable.fsync_path_data

    def meeting(path):
        barrier.wait()  # BrokenBarrierError (a failure) unless another flush runs meanwhile
        real(path)

    monkeypatch.setattr(durable, "fsync_path_data", meeting)
    blobs = [b"first", b"second"]
    store.place([store.stage(_sha(data), data) for data in blobs])
    assert all(store.verify(_sha(data)) is None for data in blobs)
