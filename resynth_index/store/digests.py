"""The lab's memory of file digests (the ``file_digests`` table), and what ingest asks of the
store before it skips a file without opening it.

Hashing a checkpoint of several gigabytes takes seconds, and re-reading a folder of images only
to find them all stored takes minutes. ``StoredDigests`` remembers the SHA-256 of each file it
has read and gives it back without reading the file again while the file's ``FileStat`` (real
path, device, inode, size, mtime, ctime) is the one recorded. Anything else (a touched file, a
file replaced by another of the same size and mtime, a link now pointing elsewhere) is read again
and its row rewritten.

Two rules keep a remembered digest true:

* a file is remembered only when its stat is the same before and after it was read, so a file
  changed while it was being read is never remembered;
* and only once its mtime is at least ``RACY_WINDOW_NS`` older than that first stat: a file
  written in the same timestamp tick as its read could be written again without its mtime moving
  (2 s ticks on FAT, 1 s on some network filesystems). A freshly written file is read again next
  time, and remembered then.

The lab's own blobs are the exception to the second rule (``remember``'s ``written``): a blob is
only ever written by rsx, whole, under a new inode (a temporary file renamed into place), with the
bytes its name says, so its stat right after it was written or verified is remembered at once.
Ingest skips a file only while its image's blob still has that stat: a blob rewritten, truncated,
replaced or removed since is caught, and the full path restores it. Bytes that rot without any
change of stat are found by ``rsx check`` (which reads every blob), and ``rsx ingest --reread``
reads the original again.

The same memory remembers weights digests (the ``weights_digests`` table): the digest of an
embedder's tensors as loaded, keyed by a digest of the loaded files' SHA-256s and everything else
that decides those tensors (``models/weights_digests.py``). Such a row is true for ever, so it is
never checked against a stat; it is recalled or recorded only for files that have settled.

The memory is an optimisation. A database that cannot be read or written (read-only, locked,
a path it cannot store) means the file is read instead; nothing here ever fails a command, and a
write waits at most ``WRITE_WAIT_S`` for a lock, then writing pauses for ``WRITE_PAUSE_S``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from resynth_index import hashing
from resynth_index.hashing import FileStat, file_stat
from resynth_index.store.embeddings import embedded_sha256s
from resynth_index.store.engine import BUSY_TIMEOUT_S, dialect_insert, in_chunks
from resynth_index.store.models import (
    FileDigestRow,
    ImageRow,
    ReferenceRow,
    WeightsDigestRow,
    utcnow,
)

#: A file whose mtime is not this much older than the moment it was read is not remembered.
RACY_WINDOW_NS = 2_000_000_000
#: How long a digest write waits for the database's write lock before it gives up.
WRITE_WAIT_S = 2.0
#: After a failed write, how long this process stops trying to write digests.
WRITE_PAUSE_S = 60.0
_COLUMNS = ("path", "device", "inode", "size_bytes", "mtime_ns", "ctime_ns", "sha256", "checked_at")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UINT64 = 1 << 64
_INT63 = 1 << 63
# what a broken or unreachable memory of digests can raise: each only means "read the file"
_MEMORY_ERRORS = (SQLAlchemyError, UnicodeError, ValueError, OverflowError)


# ------------------------------------------------------------------------- the table's rows
def _as_bigint_unsigned(value: int) -> int | None:
    """A device or inode number (unsigned 64-bit) as a signed 64-bit value; None if too big."""
    if not 0 <= value < _UINT64:
        return None
    return value - _UINT64 if value >= _INT63 else value


def _as_bigint(value: int) -> int | None:
    """A size or time as a signed 64-bit value; None when it does not fit."""
    return value if -_INT63 <= value < _INT63 else None


def _key(stat: FileStat) -> tuple[int, int, int, int, int] | None:
    """What a row must hold for its digest to be this file's; None for a file never stored
    (not a regular file, a path the database cannot hold, a number that does not fit)."""
    if not stat.regular or "\x00" in stat.path:
        return None
    try:
        stat.path.encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 (surrogate-escaped bytes)
        return None
    values = (
        _as_bigint_unsigned(stat.device),
        _as_bigint_unsigned(stat.inode),
        _as_bigint(stat.size),
        _as_bigint(stat.mtime_ns),
        _as_bigint(stat.ctime_ns),
    )
    if any(value is None for value in values):
        return None
    return values  # type: ignore[return-value]


def settled(stat: FileStat) -> bool:
    """Whether the file was last modified long enough before ``stat`` was taken to remember it
    (see ``RACY_WINDOW_NS``); a stat without the time it was taken never is."""
    return stat.seen_ns > 0 and stat.mtime_ns <= stat.seen_ns - RACY_WINDOW_NS


def remembered(session: Session, stats: Sequence[FileStat]) -> dict[FileStat, str]:
    """The remembered digest of each of ``stats`` whose row matches it in every field."""
    wanted: dict[str, list[tuple[FileStat, tuple[int, ...]]]] = {}
    for stat in stats:
        key = _key(stat)
        if key is not None:
            wanted.setdefault(stat.path, []).append((stat, key))
    found: dict[FileStat, str] = {}
    columns = (
        FileDigestRow.path,
        FileDigestRow.device,
        FileDigestRow.inode,
        FileDigestRow.size_bytes,
        FileDigestRow.mtime_ns,
        FileDigestRow.ctime_ns,
        FileDigestRow.sha256,
    )
    for paths in in_chunks(wanted):
        for path, *row_key, sha256 in session.execute(
            select(*columns).where(FileDigestRow.path.in_(paths))
        ):
            if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
                continue  # a row no writer of this module made: worthless
            for stat, wanted_key in wanted[path]:
                if tuple(row_key) == wanted_key:
                    found[stat] = sha256
    return found


def remember(
    session: Session,
    entries: Iterable[tuple[FileStat, str]],
    written: Iterable[tuple[FileStat, str]] = (),
) -> int:
    """Record (or overwrite) each file's digest; how many rows were written.

    ``entries``: files read, each with the stat taken before reading it; those not yet
    ``settled`` are left out. ``written``: the lab's blobs, each with its stat taken just after
    it was written or verified (see the module notes: no racy window for them). Left out of
    both: files ``_key`` cannot store, malformed digests.
    """
    rows: dict[str, dict[str, Any]] = {}  # one row a path: the last entry wins
    now = utcnow()
    checked = [(stat, sha256, settled(stat)) for stat, sha256 in entries]
    checked += [(stat, sha256, True) for stat, sha256 in written]
    for stat, sha256, trusted in checked:
        key = _key(stat)
        if key is None or not trusted or not _SHA256.fullmatch(sha256):
            continue
        device, inode, size, mtime_ns, ctime_ns = key
        rows[stat.path] = {
            "path": stat.path,
            "device": device,
            "inode": inode,
            "size_bytes": size,
            "mtime_ns": mtime_ns,
            "ctime_ns": ctime_ns,
            "sha256": sha256,
            "checked_at": now,
        }
    values = list(rows.values())
    if values:  # one statement, built and compiled once per dialect, run for every row
        session.execute(_upsert_statement(session.get_bind().dialect.name), values)
    return len(values)


_UPSERTS: dict[str, Any] = {}


def _upsert_statement(dialect: str) -> Any:
    """INSERT ... ON CONFLICT (path) DO UPDATE of every other column, with one parameter per
    column: run with a list of rows (executemany) it is the same statement every batch, so it
    is compiled once, not once per batch as a multi-row VALUES of varying length would be.
    Each row is its own upsert, as each row of a multi-row one was (paths are distinct)."""
    statement = _UPSERTS.get(dialect)
    if statement is None:
        base = dialect_insert(dialect, FileDigestRow)
        changed = {name: base.excluded[name] for name in _COLUMNS if name != "path"}
        statement = _UPSERTS[dialect] = base.on_conflict_do_update(
            index_elements=["path"], set_=changed
        )
    return statement


# ------------------------------------------------------------------------- weights digests
def recalled_weights(session: Session, keys: Iterable[str]) -> dict[str, str]:
    """key -> remembered weights digest, for those of ``keys`` that have a well-formed row."""
    found: dict[str, str] = {}
    for chunk in in_chunks([key for key in keys if _SHA256.fullmatch(key)]):
        rows = session.execute(
            select(WeightsDigestRow.load_key, WeightsDigestRow.digest).where(
                WeightsDigestRow.load_key.in_(chunk)
            )
        )
        found.update((key, digest) for key, digest in rows if _well_formed(digest))
    return found


def remember_weights(session: Session, key: str, digest: str) -> bool:
    """Record (or overwrite) the weights digest of ``key``; False for a malformed one."""
    if not (_SHA256.fullmatch(key) and _SHA256.fullmatch(digest)):
        return False
    base = dialect_insert(session.get_bind().dialect.name, WeightsDigestRow)
    values = {"load_key": key, "digest": digest, "recorded_at": utcnow()}
    session.execute(
        base.values(values).on_conflict_do_update(
            index_elements=["load_key"],
            set_={"digest": base.excluded.digest, "recorded_at": base.excluded.recorded_at},
        )
    )
    return True


def latest_weights(session: Session, limit: int) -> dict[str, str]:
    """The ``limit`` most recently recorded weights digests (key -> digest), for a process that
    cannot reach the database (a Ray actor) to recall from."""
    rows = session.execute(
        select(WeightsDigestRow.load_key, WeightsDigestRow.digest)
        .order_by(WeightsDigestRow.recorded_at.desc())
        .limit(limit)
    )
    return {key: digest for key, digest in rows if _well_formed(digest)}


def _well_formed(digest: object) -> bool:
    return isinstance(digest, str) and _SHA256.fullmatch(digest) is not None


# ------------------------------------------------------------------------- the lab's memory
class StoredDigests:
    """``hashing.FileDigests`` backed by the lab's ``file_digests`` table (see the module notes).

    ``digest`` gives a file's SHA-256, read from the table when the file's stat matches its row,
    else by hashing the file (and remembering it). ``known`` and ``remember`` do the same for
    many files at once, for a caller that reads the files itself (ingest). ``recall`` and
    ``record`` make it a ``models.weights_digests.WeightsDigests`` too.
    """

    def __init__(self, engine: Engine, *, write_wait_s: float = WRITE_WAIT_S) -> None:
        self._engine = engine
        self._write_wait_s = write_wait_s
        self._paused_until = 0.0

    def digest(self, path: str | Path) -> str:
        """The file's SHA-256 as ``hashing.hash_file`` gives it; raises ``OSError`` as it does."""
        before = file_stat(path)
        known = self.known([before]).get(before)
        if known is not None:
            return known
        sha256, unchanged = hashing.hash_unchanged(path, before)
        if unchanged:
            self.remember([(before, sha256)])
        return sha256

    def known(self, stats: Sequence[FileStat]) -> dict[FileStat, str]:
        """The remembered digests of these stats (those missing must be read); never raises
        for the database: one that cannot be read remembers nothing."""
        if not stats:
            return {}
        try:
            with Session(self._engine) as session, session.begin():
                return remembered(session, stats)
        except _MEMORY_ERRORS:
            return {}

    def remember(
        self,
        entries: Iterable[tuple[FileStat, str]],
        written: Iterable[tuple[FileStat, str]] = (),
    ) -> int:
        """Record digests just read (each with the stat taken before reading it) and the stats
        of blobs just written (see the module function); how many rows were written. A database
        that refuses the write (read-only, locked past ``write_wait_s``) writes nothing, and
        writing pauses for ``WRITE_PAUSE_S``; never raises for it."""
        entries, written = list(entries), list(written)
        if not (entries or written) or time.monotonic() < self._paused_until:
            return 0
        try:
            with self._waiting_briefly() as session:
                return remember(session, entries, written)
        except _MEMORY_ERRORS:
            self._paused_until = time.monotonic() + WRITE_PAUSE_S
            return 0

    def recall(self, key: str, files: Sequence[FileStat]) -> str | None:
        """The weights digest remembered under ``key``, loaded from ``files`` (their stats before
        loading); None when one has not settled or the database cannot be read."""
        if not all(settled(stat) for stat in files):
            return None
        try:
            with Session(self._engine) as session, session.begin():
                return recalled_weights(session, [key]).get(key)
        except _MEMORY_ERRORS:
            return None

    def record(self, key: str, digest: str, files: Sequence[FileStat]) -> None:
        """Remember a weights digest just computed, unless one of ``files`` has not settled;
        a database that refuses the write is treated as in ``remember``."""
        if not all(settled(stat) for stat in files) or time.monotonic() < self._paused_until:
            return
        try:
            with self._waiting_briefly() as session:
                remember_weights(session, key, digest)
        except _MEMORY_ERRORS:
            self._paused_until = time.monotonic() + WRITE_PAUSE_S

    def latest_weights(self, limit: int) -> dict[str, str]:
        """The ``limit`` newest weights digests (key -> digest), for a process without the
        database (a Ray actor); none when it cannot be read."""
        try:
            with Session(self._engine) as session, session.begin():
                return latest_weights(session, limit)
        except _MEMORY_ERRORS:
            return {}

    @contextmanager
    def _waiting_briefly(self) -> Iterator[Session]:
        """A write transaction that waits ``write_wait_s`` at most for a lock (the lab's other
        writers wait far longer: a digest is not worth a stalled command)."""
        wait_ms = max(1, int(self._write_wait_s * 1000))
        with self._engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                connection.exec_driver_sql(f"PRAGMA busy_timeout={wait_ms}")
                connection.commit()  # the session below must begin (and commit) its own
            try:
                with Session(bind=connection) as session, session.begin():
                    if not sqlite:
                        session.execute(text(f"SET LOCAL lock_timeout = {wait_ms}"))
                    yield session
            finally:
                if sqlite:  # the connection goes back to the pool: restore its patience
                    connection.exec_driver_sql(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")


class HeldDigests:
    """The digests a load makes before its lab has a database (``Lab.create`` loads the
    embedder first: a bad one leaves no lab), held in memory and then handed to the new lab's
    memory by ``hand_to``, so the first command after ``rsx init`` hashes nothing again.

    ``hashing.FileDigests`` and ``models.weights_digests.WeightsDigests``: ``digest`` reads the
    file (kept only when its stat is the same before and after), ``recall`` knows nothing yet,
    ``record`` keeps what it is given. The memory's own rules decide what it keeps (a file not
    yet settled is left out, as ever).
    """

    def __init__(self) -> None:
        self._files: list[tuple[FileStat, str]] = []
        self._weights: list[tuple[str, str, tuple[FileStat, ...]]] = []

    def digest(self, path: str | Path) -> str:
        """The file's SHA-256 as ``hashing.hash_file`` gives it; raises ``OSError`` as it does."""
        before = file_stat(path)
        sha256, unchanged = hashing.hash_unchanged(path, before)
        if unchanged:
            self._files.append((before, sha256))
        return sha256

    def recall(self, key: str, files: Sequence[FileStat]) -> str | None:
        return None

    def record(self, key: str, digest: str, files: Sequence[FileStat]) -> None:
        self._weights.append((key, digest, tuple(files)))

    def hand_to(self, memory: StoredDigests) -> None:
        """Write what was held into ``memory`` (which never fails a command for it)."""
        memory.remember(self._files)
        for key, digest, files in self._weights:
            memory.record(key, digest, files)


# ------------------------------------------------------------------------- what ingest asks
class StoredImage(NamedTuple):
    """What the store holds of an image, to tell whether a re-ingest of it would add anything."""

    image_id: int
    size_bytes: int
    width: int
    height: int
    embedded: bool  # by the embedder asked about


def stored_images(
    session: Session, sha256s: Iterable[str], fingerprint: str
) -> dict[str, StoredImage]:
    """The images among ``sha256s`` that have a row, by content hash, with whether the embedder
    ``fingerprint`` has embedded them."""
    found: dict[str, tuple[int, int, int, int]] = {}
    for chunk in in_chunks(sha256s):
        rows = session.execute(
            select(
                ImageRow.sha256, ImageRow.id, ImageRow.size_bytes, ImageRow.width, ImageRow.height
            ).where(ImageRow.sha256.in_(chunk))
        )
        found.update({sha: (image_id, size, w, h) for sha, image_id, size, w, h in rows})
    embedded = embedded_sha256s(session, list(found), fingerprint) if found else set()
    return {sha: StoredImage(*values, sha in embedded) for sha, values in found.items()}


def reference_captions(
    session: Session, generator_id: int, image_ids: Iterable[int]
) -> dict[int, str | None]:
    """image id -> caption hash of the generator's reference of it, for those it has."""
    found: dict[int, str | None] = {}
    for chunk in in_chunks(image_ids):
        rows = session.execute(
            select(ReferenceRow.image_id, ReferenceRow.caption_hash).where(
                ReferenceRow.generator_id == generator_id, ReferenceRow.image_id.in_(chunk)
            )
        )
        found.update({image_id: caption for image_id, caption in rows})
    return found
