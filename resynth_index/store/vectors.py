"""The FAISS vector index: a derived, rebuildable accelerator over the embeddings in SQLite.

SQLite is the source of truth. This module never touches the database: the lab hands it an
``EmbeddingSource`` callable that yields stored embeddings above a watermark. One index holds the
vectors of one embedder fingerprint in a FAISS ``IndexIDMap2(IndexFlatIP)`` keyed by embedding id,
and lives in a single file written atomically::

    b"RSXVEC1\\n" | header length (4 bytes, little-endian) | JSON header | faiss index bytes

The header records the fingerprint, the dimension, the vector count, the watermark (largest id
added, -1 when empty) and the SHA-256 of the faiss bytes, so a truncated, corrupt or foreign file
is detected on load and rebuilt from the database instead of being trusted.

Catching up reads the rows above the watermark, in id order: the fast path. That alone could
miss a row for good: on PostgreSQL an id comes from a sequence when the row is inserted, and
transactions commit in any order, so a row with a lower id can become visible after a higher one
was added. So ``catch_up`` also compares the number of stored rows with the index's and, when
they differ, the ids alone (8 bytes a row, no vectors): the late rows are fetched by id and added
below the watermark, and ids the database no longer holds make the index rebuild. Membership
tests use a binary search over a cached sorted copy of the id list (8 bytes a vector) rather than
a second copy of the vectors, which would double the memory at a million 768-dimensional vectors.

Opening the file costs O(N): it is read whole, hashed and parsed, and saving rewrites and fsyncs
it whole (seconds at a million vectors). So a query never opens it: the few hundred vectors an
answer compares are read by id from the database (``embeddings.vectors_by_embedding_id``), or
from an index the process already holds in memory (``rsx serve``). Syncing is amortised over
many writes: after an ingest or a resynthesis run, by ``rsx index sync``, and by ``rsx serve``
when idle. An index behind the database (every id it holds stored, some stored ids not yet
added) is a normal state between syncs, not damage: ``check`` counts those rows in
``IndexHealth.behind``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from resynth_index.errors import StoreError
from resynth_index.hashing import CHUNK, hash_stream
from resynth_index.store.durable import fsync_directory
from resynth_index.store.faults import crash_point
from resynth_index.store.locks import directory_lock, process_alive

if TYPE_CHECKING:
    import numpy

EmbeddingSource = Callable[[int], Iterator[tuple["numpy.ndarray", "numpy.ndarray"]]]
"""``source(after_id)`` yields batches ``(ids int64 (n,), vectors float32 (n, dim))`` of every
stored embedding of one fingerprint with id > after_id, in increasing id order."""


class StoredEmbeddings(Protocol):
    """The database's side of ``VectorIndex.catch_up`` for one fingerprint, besides the
    ``EmbeddingSource``: how many rows an id range holds, their ids alone, a few rows by id."""

    def count(self, lower: int, upper: int) -> int:
        """How many embeddings of the fingerprint with lower < id <= upper are stored now."""
        ...

    def ids(self, lower: int, upper: int) -> numpy.ndarray:
        """The stored ids with lower < id <= upper (int64, any order): ids alone, no vectors."""
        ...

    def fetch(self, ids: numpy.ndarray) -> Iterator[tuple[numpy.ndarray, numpy.ndarray]]:
        """Batches ``(ids, vectors)`` of those of ``ids`` that are stored, in id order."""
        ...


MAGIC = b"RSXVEC1\n"
_LENGTH = struct.Struct("<I")
_MAX_HEADER = 1 << 16
_HEADER_KEYS = {"fingerprint": str, "dim": int, "count": int, "watermark": int, "checksum": str}
#: How many of its newest ids catch-up first compares with the database when rows are missing:
#: late rows come from transactions that were in flight at the last sync, so they are recent.
_FIRST_WINDOW = 1024


@dataclass
class IndexHealth:
    """What ``VectorIndex.check`` found: ``ok`` when ``problems`` (one line each) is empty.

    ``behind`` > 0 says the problems amount to a lag and nothing worse: the file is sound and
    made by this embedder, every id it holds is stored, and that many stored ids are not in it
    yet (queries store embeddings without syncing the index; a sync adds them).

    ``ahead`` > 0: the file, made by this embedder, holds that many ids the database does not.
    rsx never deletes an embedding, so the database lost rows it once had (an older copy put in
    its place): the index is then the record of what is missing, not something to rebuild.
    """

    ok: bool
    problems: list[str] = field(default_factory=list)
    behind: int = 0
    ahead: int = 0


@dataclass(frozen=True)
class SyncReport:
    """What ``VectorIndex.sync`` did since the index was loaded or last synced."""

    count: int  # vectors in the index now
    added: int  # vectors it gained (negative only after a rebuild that dropped deleted rows)
    rebuilt: bool  # built from the database: the file was missing, unusable or foreign
    written: bool  # the file was rewritten


class MissingVectorsError(StoreError, KeyError):
    """Ids asked of the index that it does not hold (a StoreError that is also a KeyError)."""

    __str__ = Exception.__str__

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


class _Unusable(Exception):
    """Internal: the index file cannot be used; the message says why."""


class VectorIndex:
    """One FAISS IndexIDMap2(IndexFlatIP) per embedder fingerprint, persisted as a single file.

    A query needs only its caption's few dozen resyntheses, so the lab never searches the whole
    index: a process that holds one loaded (``rsx serve``) gathers those vectors by embedding id
    with ``vectors_for`` and the caller scores them (inner products, i.e. cosine similarities of
    the L2-normalised vectors embedders produce); a CLI query reads them from the database.
    """

    def __init__(self, path: Path, fingerprint: str, dim: int) -> None:
        """An empty in-memory index for ``fingerprint``; nothing is read or written yet."""
        if dim < 1:
            raise ValueError(f"vector dimension must be positive, got {dim}")
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.dim = int(dim)
        self._index = _new_faiss_index(self.dim)
        self._watermark = -1
        self._id_cache: numpy.ndarray | None = None
        self._seen: tuple[int, ...] | None = None  # the file as this index last saw it
        # what ``sync`` reports: the count it started from, whether it rebuilt or wrote
        self._baseline = 0
        self._rebuilt = False
        self._written = False

    # ------------------------------------------------------------------ properties
    @property
    def watermark(self) -> int:
        """The largest id added, -1 when the index is empty."""
        return self._watermark

    @property
    def count(self) -> int:
        """How many vectors the index holds."""
        return int(self._index.ntotal)

    # ------------------------------------------------------------------ opening and saving
    @classmethod
    def open(
        cls,
        path: Path,
        fingerprint: str,
        dim: int,
        source: EmbeddingSource,
        db_count: int | None = None,
        db_max_id: int | None = None,
        *,
        stored: StoredEmbeddings | None = None,
    ) -> VectorIndex:
        """Load the index file, catch it up with the database, or rebuild it when inconsistent.

        A missing, truncated or corrupt file, or one made for another fingerprint or dimension,
        is rebuilt from ``source(-1)``. The file is saved whenever anything changed.

        With ``stored`` (what the lab gives), the loaded index is brought up to date by
        ``catch_up``, which misses no row, whatever order rows committed in: only ids the
        database no longer holds (rows deleted, a file from the future) force a rebuild.

        Without it, the counts ``db_count`` and ``db_max_id`` taken by the caller decide: an
        index that disagrees with them after reading the rows above its watermark is rebuilt.
        They may be older than the file: another process can store embeddings and save the index
        between the moment the caller counted and the moment the file is read. Rows the catch-up
        meets above ``db_max_id`` are such newcomers: they are added to the expected count
        instead of forcing a needless rebuild.
        """
        import numpy as np

        if stored is None and (db_count is None or db_max_id is None):
            raise TypeError("VectorIndex.open needs stored=..., or db_count and db_max_id")
        index = cls(path, fingerprint, dim)
        index._remove_stale_temp_files()
        seen = _identity(index.path)
        try:
            header, loaded = _read_index_file(index.path)
            if header["fingerprint"] != fingerprint or header["dim"] != index.dim:
                raise _Unusable("index file made for another embedder")
        except _Unusable:
            index = cls.rebuild(path, fingerprint, dim, source, _seen=seen)
            # reading by pages of ids can pass a row that commits late below the page: look again
            if stored is not None and index.catch_up(source, stored):
                index.save()
            return index
        index._index = loaded
        index._watermark = header["watermark"]
        index._seen = seen
        index._baseline = index.count
        if stored is not None:
            if index.catch_up(source, stored):
                index.save()
            return index
        assert db_count is not None and db_max_id is not None
        changed = False
        newcomers = 0  # rows with ids above db_max_id: stored after the caller counted
        for ids, vectors in source(min(index._watermark, db_max_id)):
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            newcomers += int(np.count_nonzero(ids > db_max_id))
            fresh = ids > index._watermark  # ids increase, so this is a suffix
            if not fresh.all() and not index._contains(ids[~fresh]).all():
                return cls.rebuild(path, fingerprint, dim, source, _seen=seen)
            if fresh.any():
                index.add(ids[fresh], vectors[fresh])
                changed = True
        if index.count != db_count + newcomers:
            return cls.rebuild(path, fingerprint, dim, source, _seen=seen)
        if changed:
            index.save()
        return index

    @classmethod
    def rebuild(
        cls,
        path: Path,
        fingerprint: str,
        dim: int,
        source: EmbeddingSource,
        *,
        _seen: tuple[int, ...] | None = None,
    ) -> VectorIndex:
        """Build the index from scratch from ``source(-1)`` and save it.

        The file found before reading the database (``_seen``, given by ``open``, which judged
        it) is the one this rebuild replaces; one that another process saved meanwhile is kept
        when it is at least as new (see ``save``).
        """
        index = cls(path, fingerprint, dim)
        index._remove_stale_temp_files()
        index._seen = _identity(index.path) if _seen is None else _seen
        index._rebuilt = True
        for ids, vectors in source(-1):
            index.add(ids, vectors)
        index.save()
        return index

    def save(self) -> bool:
        """Write the index atomically: temp file, fsync, ``os.replace``, fsync the directory.

        A crash at any point leaves either the old file or the new one, never a mix; a leftover
        temp file is removed by the next ``open``.

        Several processes may save the same index: saves are serialised by an exclusive lock on
        the index directory, and a save never replaces a file that another process wrote after
        this one last looked (loaded, rebuilt or saved it) when that file is at least as new
        (watermark and count at least ours); the index on disk never goes back in time. Returns
        True when the file was written, False when a newer one was kept.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with directory_lock(self.path.parent):
            current = _identity(self.path)
            if current is not None and current != self._seen and self._newer_on_disk():
                self._seen = None  # theirs is newer: our next save compares again
                return False
            self._write()
            self._seen = _identity(self.path)
        self._written = True
        return True

    def sync(self, source: EmbeddingSource, stored: StoredEmbeddings) -> SyncReport:
        """Catch up with the database and save when anything changed: the amortised step
        (after an ingest, ``rsx index sync``, an idle ``rsx serve``), never one per query.

        Reports what changed since the index was loaded (by ``open``, which may already have
        caught up, rebuilt or saved) or last synced, then starts counting afresh.
        """
        if self.catch_up(source, stored):
            self.save()
        report = SyncReport(
            count=self.count,
            added=self.count - self._baseline,
            rebuilt=self._rebuilt,
            written=self._written,
        )
        self._baseline, self._rebuilt, self._written = self.count, False, False
        return report

    def _newer_on_disk(self) -> bool:
        """Whether the file (its header) is at least as new as this index: a watermark and a
        vector count at least ours (late rows below the watermark raise the count alone)."""
        try:
            header = _read_header(self.path)
        except _Unusable:
            return False
        return (
            header["fingerprint"] == self.fingerprint
            and header["dim"] == self.dim
            and header["watermark"] >= self._watermark
            and header["count"] >= self.count
        )

    def _write(self) -> None:
        import faiss

        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        header = {
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "count": self.count,
            "watermark": self._watermark,
            "checksum": "0" * 64,
        }
        try:
            with open(tmp, "wb") as handle:
                placeholder = _encode_header(header)
                handle.write(MAGIC)
                handle.write(placeholder)
                digest = hashlib.sha256()

                def write(chunk: bytes) -> int:
                    digest.update(chunk)
                    handle.write(chunk)
                    return len(chunk)

                # PyCallbackIOWriter/Reader are missing from faiss's stubs
                writer = faiss.PyCallbackIOWriter(write)  # type: ignore[attr-defined]
                faiss.write_index(self._index, writer)
                header["checksum"] = digest.hexdigest()
                final = _encode_header(header)
                assert len(final) == len(placeholder)
                handle.seek(len(MAGIC))
                handle.write(final)
                handle.flush()
                os.fsync(handle.fileno())
            crash_point("index-save")  # new index written, old one still in place
            os.replace(tmp, self.path)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"could not write index {self.path}: {error}") from error
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_directory(self.path.parent)

    # ------------------------------------------------------------------ adding
    def add(self, ids: numpy.ndarray, vectors: numpy.ndarray) -> None:
        """Append vectors under ``ids`` (strictly increasing, all above the watermark)."""
        import numpy as np

        ids, vectors = self._checked(ids, vectors)
        if len(ids) == 0:
            return
        if ids[0] <= self._watermark or (len(ids) > 1 and bool(np.any(np.diff(ids) <= 0))):
            raise StoreError(
                f"cannot add to index {self.path}: ids must increase strictly and exceed the "
                f"watermark {self._watermark}"
            )
        self._index.add_with_ids(vectors, ids)
        self._watermark = int(ids[-1])
        self._id_cache = None

    def add_late(self, ids: numpy.ndarray, vectors: numpy.ndarray) -> None:
        """Add vectors under ``ids`` in any order, below the watermark too: rows that became
        visible after rows with higher ids were added. Every id must be new to the index."""
        import numpy as np

        ids, vectors = self._checked(ids, vectors)
        if len(ids) == 0:
            return
        if len(np.unique(ids)) != len(ids) or bool(self._contains(ids).any()):
            raise StoreError(f"cannot add to index {self.path}: some ids are there already")
        self._index.add_with_ids(vectors, ids)
        self._watermark = max(self._watermark, int(ids.max()))
        self._id_cache = None

    def _checked(
        self, ids: numpy.ndarray, vectors: numpy.ndarray
    ) -> tuple[numpy.ndarray, numpy.ndarray]:
        """``ids`` as int64 (n,) and ``vectors`` as float32 (n, dim), or a StoreError."""
        import numpy as np

        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(ids) and (vectors.ndim != 2 or vectors.shape != (len(ids), self.dim)):
            raise StoreError(
                f"cannot add to index {self.path}: expected vectors of shape ({len(ids)}, "
                f"{self.dim}), got {tuple(vectors.shape)}"
            )
        return ids, vectors

    def catch_up(self, source: EmbeddingSource, stored: StoredEmbeddings) -> bool:
        """Bring the index up to date with the database; True when it changed (save it then).

        The fast path reads the rows above the watermark. Then the database counts its rows up
        to the new watermark (one count, no rows read): the same number as the index holds
        means nothing is missing (rsx never deletes an embedding). A different number means a
        row with a lower id committed after a higher one was added (PostgreSQL), or rows were
        deleted. The ids alone (no vectors) are then compared over the newest ids first, where
        late rows are, widening the range until the counts below it agree: missing rows are
        fetched by id and added; ids the database no longer holds rebuild the index from
        ``source(-1)``, in place. A row that commits later still is found by the next
        catch-up the same way: none is skipped for good. Rows above the watermark that commit
        meanwhile are left to the next fast path.
        """
        import numpy as np

        changed = False
        for ids, vectors in source(self._watermark):
            self.add(ids, vectors)
            changed = True
        top = self._watermark
        held = self._sorted_ids()
        total = stored.count(-1, top)
        if total == len(held):
            return changed
        lower = -1  # compare every id, unless the rows below a window of the newest agree
        window = _FIRST_WINDOW
        while total > len(held) and window < len(held):
            bound = int(held[len(held) - window - 1])
            if total - stored.count(bound, top) == len(held) - window:
                lower = bound
                break
            window *= 16
        expected = np.unique(np.asarray(stored.ids(lower, top), dtype=np.int64))
        mine = held[held > lower]
        if len(np.setdiff1d(mine, expected, assume_unique=True)):
            self._index = _new_faiss_index(self.dim)  # rows deleted: start again
            self._watermark = -1
            self._id_cache = None
            self._rebuilt = True
            for ids, vectors in source(-1):
                self.add(ids, vectors)
            return True
        missing = np.setdiff1d(expected, mine, assume_unique=True)
        if len(missing):
            for ids, vectors in stored.fetch(missing):
                self.add_late(ids, vectors)
                changed = True
        return changed

    # ------------------------------------------------------------------ reading
    def vectors_for(self, ids: numpy.ndarray) -> numpy.ndarray:
        """The stored vectors for ``ids``, shape (n, dim), in the order asked."""
        import numpy as np

        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        present = self._contains(ids)
        if not present.all():
            missing = [int(i) for i in ids[~present]]
            shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise MissingVectorsError(
                f"index {self.path} has no vector for embedding id(s) {shown}", missing
            )
        return self._index.reconstruct_batch(ids)

    def _contains(self, ids: numpy.ndarray) -> numpy.ndarray:
        """Boolean mask: which of ``ids`` the index holds (binary search in the sorted id list)."""
        import numpy as np

        stored = self._sorted_ids()
        if len(stored) == 0:
            return np.zeros(len(ids), dtype=bool)
        position = np.minimum(np.searchsorted(stored, ids), len(stored) - 1)
        return stored[position] == ids

    def _sorted_ids(self) -> numpy.ndarray:
        """The index's ids in increasing order (cached until the next add). They are stored in
        that order unless late rows were added below the watermark; only then is a sort needed."""
        import faiss
        import numpy as np

        if self._id_cache is None:
            ids = faiss.vector_to_array(self._index.id_map)
            if len(ids) > 1 and bool(np.any(np.diff(ids) < 0)):
                ids.sort()
            self._id_cache = ids
        return self._id_cache

    # ------------------------------------------------------------------ checking
    def check(
        self,
        db_count: int,
        db_max_id: int,
        db_ids: Callable[[], numpy.ndarray] | None = None,
    ) -> IndexHealth:
        """Compare the index file with the database without repairing anything.

        ``db_ids``, when given, returns every stored embedding id of this fingerprint, so ids
        present on one side only are reported too.
        """
        import faiss
        import numpy as np

        try:
            header, loaded = _read_index_file(self.path)
        except _Unusable as reason:
            return IndexHealth(ok=False, problems=[str(reason)])
        problems = []
        if header["fingerprint"] != self.fingerprint:
            problems.append(
                f"index was built by embedder {header['fingerprint'][:12]}, "
                f"the lab uses {self.fingerprint[:12]}"
            )
        if header["dim"] != self.dim:
            problems.append(
                f"index holds {header['dim']}-dimensional vectors, the embedder makes {self.dim}"
            )
        if header["count"] != db_count:
            problems.append(f"index holds {header['count']} vectors, database {db_count}")
        if header["watermark"] > db_max_id:
            problems.append(f"index watermark {header['watermark']} ahead of database {db_max_id}")
        elif header["watermark"] < db_max_id:
            problems.append(f"index watermark {header['watermark']} behind database {db_max_id}")
        behind = ahead = 0
        if db_ids is not None:
            stored = faiss.vector_to_array(loaded.id_map)
            expected = np.unique(np.asarray(db_ids(), dtype=np.int64))
            lacking = np.setdiff1d(expected, stored, assume_unique=True)
            extra = np.setdiff1d(stored, expected, assume_unique=True)
            sound = header["fingerprint"] == self.fingerprint and header["dim"] == self.dim
            if sound and len(lacking) and not len(extra):
                behind = len(lacking)
            if sound:
                ahead = len(extra)
            if len(lacking):
                problems.append(
                    f"{len(lacking)} database embedding(s) missing from the index"
                    f" (first: {_first(lacking)})"
                )
            if len(extra):
                problems.append(
                    f"{len(extra)} index id(s) not in the database (first: {_first(extra)})"
                )
        return IndexHealth(ok=not problems, problems=problems, behind=behind, ahead=ahead)

    # ------------------------------------------------------------------ housekeeping
    def _remove_stale_temp_files(self) -> None:
        """Delete temp files left by a save that crashed (not those of a live process)."""
        if not self.path.parent.is_dir():
            return
        for tmp in self.path.parent.glob(f"{self.path.name}.tmp-*"):
            owner = tmp.name.rsplit("-", 1)[-1]
            if owner.isdigit() and int(owner) != os.getpid() and process_alive(int(owner)):
                continue
            try:
                tmp.unlink()
            except OSError:
                pass


# ---------------------------------------------------------------------- helpers
def _new_faiss_index(dim: int) -> Any:
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _first(values: numpy.ndarray, shown: int = 5) -> str:
    text = ", ".join(str(int(v)) for v in values[:shown])
    return text + (", ..." if len(values) > shown else "")


def _encode_header(header: dict[str, Any]) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    return _LENGTH.pack(len(text)) + text


def _read_index_file(path: Path) -> tuple[dict[str, Any], Any]:
    """Read and verify an index file; raise ``_Unusable`` with a one-line reason if it is bad."""
    import faiss
    import numpy as np

    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise _Unusable("index file missing") from None
    except OSError as error:
        raise _Unusable(f"index file unreadable: {error}") from None
    with handle:
        try:
            header = _read_header_from(handle)
            start = handle.tell()
            # verify the checksum before faiss parses anything: garbage sizes could ask for
            # absurd allocations
            if hash_stream(handle) != header["checksum"]:
                raise _Unusable("index file unreadable: checksum mismatch (truncated or damaged)")
            handle.seek(start)
            try:
                reader = faiss.PyCallbackIOReader(handle.read, CHUNK)  # type: ignore[attr-defined]
                index = faiss.read_index(reader)
            except RuntimeError as error:
                lines = str(error).strip().splitlines() or ["unknown error"]
                raise _Unusable(
                    f"index file unreadable: faiss data is damaged ({lines[-1]})"
                ) from None
            if handle.read(1):
                raise _Unusable("index file unreadable: trailing bytes after the faiss data")
        except OSError as error:
            raise _Unusable(f"index file unreadable: {error}") from None
    if not isinstance(index, faiss.IndexIDMap2) or index.d != header["dim"]:
        raise _Unusable("index file unreadable: unexpected faiss index type or dimension")
    if index.ntotal != header["count"]:
        raise _Unusable(
            f"index file unreadable: header says {header['count']} vectors, data {index.ntotal}"
        )
    stored = faiss.vector_to_array(index.id_map)
    if len(stored) > 1 and bool(np.any(np.diff(stored) <= 0)):  # late rows added: sort to check
        stored.sort()
        if bool(np.any(np.diff(stored) == 0)):
            raise _Unusable("index file unreadable: an id appears twice")
    if header["watermark"] != (int(stored[-1]) if len(stored) else -1):
        raise _Unusable("index file unreadable: header watermark does not match the data")
    return header, index


def _read_header(path: Path) -> dict[str, Any]:
    """Only the header of an index file (nothing verified beyond its own shape)."""
    try:
        with open(path, "rb") as handle:
            return _read_header_from(handle)
    except OSError as error:
        raise _Unusable(f"index file unreadable: {error}") from None


def read_index_header(path: Path) -> dict[str, Any]:
    """The header of the index file at ``path`` (fingerprint, dim, count, watermark, checksum),
    without loading its vectors; a StoreError says, in one line, why it cannot be read."""
    try:
        return _read_header(Path(path))
    except _Unusable as reason:
        raise StoreError(str(reason)) from None


def _read_header_from(handle: BinaryIO) -> dict[str, Any]:
    """Read the magic, the length and the JSON header at the start of an open index file."""
    if handle.read(len(MAGIC)) != MAGIC:
        raise _Unusable("index file unreadable: not an rsx vector index")
    raw = handle.read(_LENGTH.size)
    if len(raw) != _LENGTH.size:
        raise _Unusable("index file unreadable: truncated header")
    (length,) = _LENGTH.unpack(raw)
    if length > _MAX_HEADER:
        raise _Unusable("index file unreadable: header too large")
    return _parse_header(handle.read(length))


def _identity(path: Path) -> tuple[int, ...] | None:
    """Which file is at ``path`` now (None when none): ``os.replace`` gives a new identity."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _Unusable("index file unreadable: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _Unusable("index file unreadable: header is not a JSON object")
    for key, kind in _HEADER_KEYS.items():
        value = header.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _Unusable(f"index file unreadable: header field {key!r} is missing or invalid")
    return header
