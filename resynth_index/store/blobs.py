"""Content-addressed blob store: every imported image file, kept byte for byte under its SHA-256.

Layout: ``<root>/ab/cd/<sha256>`` where ``ab`` and ``cd`` are the first two byte pairs of the
digest, so no directory grows past a few thousand entries. A blob is never written in place: its
bytes go to a temporary file in the target directory, which is renamed over the blob's name once
those bytes are on the disk, so a crash leaves either the whole blob or a temporary file that
``remove_temp_files`` cleans up, never a half-written blob.

Writing is done in two steps so that a batch pays for durability once. ``stage`` writes a blob's
temporary file (its bytes not yet flushed, nothing in place); ``place`` puts a batch of staged
blobs in place durably: every temporary file's bytes flushed, then the renames, then each
distinct directory holding a new name (or a directory ``stage`` created) fsynced once; the
flushes of a batch run side by side (``store/durable.py``). ``put`` is ``place`` of one
``stage``. A caller that batches (ingest, the resynthesis writer) stages the blobs of a batch,
places them, then commits the rows pointing at them. The argument:

* a blob's name never points at bytes that are not on the disk: the data is flushed before the
  rename, so after any crash a name holds the whole blob or nothing (never a short or zeroed
  file a row could point at; ``rsx check`` would call that "hash mismatch");
* the rename (and the creation of ``ab/`` and ``ab/cd/``) is durable once ``place`` returns,
  before any row names the blob, so a committed row never points at a blob a crash can take
  away; a blob found intact is flushed too (another writer may have renamed it and not synced);
* until then a crash loses at most blobs no row points at, and temporary files: debris.

A blob is written before the row that points at it, so until that row commits it looks exactly
like debris (an orphan blob, or a temporary file). Writers therefore hold ``writing()`` (a shared
lock on the root) from the first blob to the commit of its row, and cleaning holds
``cleaning()`` (the exclusive lock): debris is removed only while no writer is at work.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from resynth_index.errors import StoreError
from resynth_index.hashing import hash_bytes, hash_file
from resynth_index.store import durable
from resynth_index.store.faults import crash_point
from resynth_index.store.locks import directory_lock

_SHA_RE = re.compile(r"[0-9a-f]{64}")
_TEMP_PREFIX = ".tmp-"


class StagedBlob(NamedTuple):
    """A blob ``stage`` wrote to a temporary file (``temp``), or found intact in place (``temp``
    None), and the directories whose entries make it durable once renamed."""

    target: Path
    temp: Path | None
    directories: tuple[Path, ...]


class BlobStore:
    """Blobs under ``root`` (normally ``<lab>/blobs``), addressed by lowercase hex SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writers' (shared) lock: blobs put in this block are not debris, even before
        the rows that point at them commit. Waits while a cleaning is under way."""
        with directory_lock(self.root, shared=True):
            yield

    @contextmanager
    def cleaning(self) -> Iterator[bool]:
        """Try for the exclusive lock, without waiting: True when no writer is at work, so that
        orphan blobs and temporary files are debris; False when some writer holds ``writing``."""
        with directory_lock(self.root, wait=False) as held:
            yield held

    def relpath_for(self, sha256: str) -> str:
        """The blob's path relative to the root, as stored in the database: ``ab/cd/<sha>``."""
        _check_sha(sha256)
        return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def path_for(self, sha256: str) -> Path:
        """Absolute location of a blob (it may not exist)."""
        return self.root / self.relpath_for(sha256)

    def put(self, sha256: str, data: bytes) -> Path:
        """Store ``data`` under ``sha256`` atomically and durably; storing the same blob again
        does nothing.

        The digest is checked first, so a wrong or mistyped hash can never file bytes under the
        wrong name. An existing blob whose content no longer matches is rewritten.
        """
        return self.place([self.stage(sha256, data)])[0]

    def stage(self, sha256: str, data: bytes) -> StagedBlob:
        """The first half of ``put``: the digest checked and the bytes written to a temporary
        file beside the blob's place (not yet flushed, nothing renamed), or an intact blob found
        in place. ``place`` finishes it, or ``discard`` removes it; a crash in between leaves a
        temporary file (debris). Raises StoreError."""
        _check_sha(sha256)
        actual = hash_bytes(data)
        if actual != sha256:
            raise StoreError(f"blob {sha256} was given bytes whose SHA-256 is {actual}")
        target = self.path_for(sha256)
        directory = target.parent
        if target.is_file() and hash_file(target) == sha256:
            return StagedBlob(target, None, (directory,))
        try:
            created = self._make_directories(directory)
            temp = directory / f"{_TEMP_PREFIX}{sha256[:16]}-{secrets.token_hex(6)}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StoreError(f"cannot write blob {target}: {exc.strerror or exc}") from None
        crash_point("blob-write")  # temp file written, not yet in place
        # the rename's entry lives in ``directory``; a directory made here lives in its parent
        return StagedBlob(target, temp, (directory, *(made.parent for made in created)))

    def place(self, staged: Sequence[StagedBlob]) -> list[Path]:
        """Put staged blobs in place, durably (see the module notes): when this returns, every
        one is on the disk under its name. Returns their paths, in order. Raises StoreError
        (a blob whose rename or flush failed is not in place; its temporary file is removed)."""
        if not staged:
            return []
        # (temporary file, blob) of each blob to rename, each once
        moves = list(dict.fromkeys((b.temp, b.target) for b in staged if b.temp is not None))
        try:
            durable.flush_files([temp for temp, _target in moves])
            for temp, target in moves:
                os.replace(temp, target)
            durable.fsync_directories(d for blob in staged for d in blob.directories)
        except OSError as exc:
            for temp, _target in moves:  # those not renamed yet
                temp.unlink(missing_ok=True)
            raise StoreError(f"cannot put blobs in {self.root}: {exc.strerror or exc}") from None
        return [blob.target for blob in staged]

    def discard(self, staged: Iterable[StagedBlob]) -> None:
        """Remove the temporary files of staged blobs that will not be placed."""
        for blob in staged:
            if blob.temp is not None:
                blob.temp.unlink(missing_ok=True)

    def _make_directories(self, directory: Path) -> list[Path]:
        """Create ``directory`` and any missing parent up to the root; those created."""
        missing = []
        here = directory
        while not here.is_dir():
            missing.append(here)
            if here == self.root or here.parent == here:
                break
            here = here.parent
        if missing:
            directory.mkdir(parents=True, exist_ok=True)
        return missing

    def exists(self, sha256: str) -> bool:
        """Whether a file stands where the blob belongs (its bytes unchecked: see ``verify``)."""
        return self.path_for(sha256).is_file()

    def read(self, sha256: str) -> bytes:
        """The blob's bytes; a missing blob raises ``StoreError``."""
        path = self.path_for(sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"blob {sha256} is missing from {self.root}") from None
        except OSError as exc:
            raise StoreError(f"cannot read blob {path}: {exc.strerror or exc}") from None

    def verify(self, sha256: str) -> str | None:
        """``None`` if the blob is present and intact, else what is wrong: ``"missing"``,
        ``"hash mismatch"`` (its bytes were altered) or ``"unreadable"``."""
        path = self.path_for(sha256)
        if not path.is_file():
            return "missing"
        try:
            actual = hash_file(path)
        except FileNotFoundError:
            return "missing"
        except OSError:
            return "unreadable"
        return None if actual == sha256 else "hash mismatch"

    def iter_shas(self) -> Iterator[str]:
        """Every blob on disk that sits where its name says it should (for orphan detection)."""
        if not self.root.is_dir():
            return
        for first in sorted(self.root.iterdir()):
            if not (first.is_dir() and len(first.name) == 2):
                continue
            for second in sorted(first.iterdir()):
                if not (second.is_dir() and len(second.name) == 2):
                    continue
                for entry in sorted(second.iterdir()):
                    name = entry.name
                    if (
                        _SHA_RE.fullmatch(name)
                        and name[:2] == first.name
                        and name[2:4] == second.name
                        and entry.is_file()
                    ):
                        yield name

    def temp_files(self) -> list[Path]:
        """The temporary files of ``put`` calls: under way, or left behind by an interruption."""
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(f"*/*/{_TEMP_PREFIX}*"))

    def stray_files(self) -> list[Path]:
        """Files under the root that are neither a blob where its name says it belongs nor a
        temporary file of ``put``: things the blob store never writes. Judged by name and place
        alone, so a writer at work never makes one; nothing is removed."""
        if not self.root.is_dir():
            return []
        strays = []
        for directory, _subdirs, names in os.walk(self.root):
            for name in names:
                path = Path(directory, name)
                parts = path.relative_to(self.root).parts
                if len(parts) == 3 and (
                    name.startswith(_TEMP_PREFIX)
                    or (_SHA_RE.fullmatch(name) and parts[:2] == (name[:2], name[2:4]))
                ):
                    continue  # a temporary file of put, or a blob in its place
                strays.append(path)
        return sorted(strays)

    def remove_temp_files(self) -> int:
        """Delete the temporary files of ``put``; returns how many. Only safe inside ``cleaning``
        (when it yields True): a writer's file may be one it is still writing."""
        removed = 0
        for temp in self.temp_files():
            try:
                temp.unlink()
                removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"cannot remove temporary file {temp}: {exc.strerror}") from None
        return removed


class Quarantine:
    """Where ``rsx check --repair`` puts blobs no row points at, instead of deleting them: a
    folder laid out like the blob store (``ab/cd/<sha256>``). A blob that turns out to be wanted
    (a database restored from a backup names it) is moved back; only ``purge`` deletes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, sha256: str) -> Path:
        _check_sha(sha256)
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def shas(self) -> list[str]:
        """The blobs held, by name (sorted)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.glob("*/*/*") if _SHA_RE.fullmatch(p.name))

    def take(self, store: BlobStore, sha256: str) -> None:
        """Move a blob from ``store`` into the quarantine (a rename when both share a disk)."""
        _move(store.path_for(sha256), self.path_for(sha256))

    def give_back(self, store: BlobStore, sha256: str) -> bool:
        """Move a quarantined blob back into ``store`` if its bytes still match its name;
        False when it is not here or was altered (it is then left where it is)."""
        path = self.path_for(sha256)
        try:
            if hash_file(path) != sha256:
                return False
        except OSError:
            return False
        _move(path, store.path_for(sha256))
        return True

    def purge(self) -> int:
        """Delete every quarantined blob; how many were deleted."""
        removed = 0
        for sha256 in self.shas():
            self.path_for(sha256).unlink(missing_ok=True)
            removed += 1
        return removed


def _move(source: Path, target: Path) -> None:
    """Move a file durably: into place under its name, its new directory entry flushed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            shutil.copy2(source, target)  # another disk: copied whole, then the old one goes
            durable.flush_files([target])
            source.unlink()
        durable.fsync_directories([target.parent, source.parent])
    except OSError as exc:
        raise StoreError(f"cannot move {source} to {target}: {exc.strerror or exc}") from None


def _check_sha(sha256: str) -> None:
    if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
        raise StoreError(f"{sha256!r} is not a SHA-256 digest (64 lowercase hex characters)")
