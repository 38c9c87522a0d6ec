"""Content hashes: the SHA-256 digests that name images, blobs, settings and model files.

Content addressing is how the lab recognises what it has seen (DESIGN.md, principle 2), so every
digest is made here, once: of bytes, of a file or an open stream read in chunks (a checkpoint may
be gigabytes), and of JSON in one canonical form (sorted keys, no whitespace) so that equal
settings always give the same digest. A foundation module: the store, the media parsers and the
model backends all use it, and it imports nothing of rsx.

A file's digest can also be remembered (``FileDigests``): hashing a checkpoint of several gigabytes
takes seconds, so the lab keeps the digest of each file it has read, keyed by ``FileStat`` (the
real path, device, inode, size, modification and change times). The protocol lives here, with the
stat that keys it, so that the model backends can be handed a lab's memory of digests without
importing the store that implements it (``store/digests.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat as stat_module
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

CHUNK = 1 << 20
"""Bytes read at a time when hashing a file or a stream."""


def hash_bytes(data: bytes) -> str:
    """SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def hash_stream(handle: BinaryIO) -> str:
    """SHA-256 hex digest of what is left to read in ``handle``, read in chunks to its end."""
    digest = hashlib.sha256()
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def hash_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes (read in chunks; raises ``OSError`` as ``open``)."""
    with open(path, "rb") as handle:
        return hash_stream(handle)


def canonical_json(obj: Any) -> str:
    """JSON text that is identical for equal objects (sorted keys, compact separators)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def hash_json(obj: Any) -> str:
    """SHA-256 hex digest of ``obj`` as canonical JSON."""
    return hash_bytes(canonical_json(obj).encode("utf-8"))


def combine(*parts: str) -> str:
    """One digest from several (order matters)."""
    return hash_bytes("\x1f".join(parts).encode("utf-8"))


@dataclass(frozen=True)
class FileStat:
    """Which file a path names and which version of its bytes: what a remembered digest is keyed
    by. Two stats are equal when every field but ``seen_ns`` is: a file rewritten (size, mtime,
    ctime), replaced by another (inode) or moved to another disk (device) is another version.

    ``ctime_ns`` cannot be set by a program (``os.utime`` sets it to now), so a file rewritten in
    place and given its old mtime back still differs. ``seen_ns`` is the wall-clock time just
    before the stat was taken, for the store's rule on files modified too recently to trust.
    """

    path: str  # the real path: links resolved
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    regular: bool  # a regular file (not a FIFO, a device, a folder)
    seen_ns: int = field(default=0, compare=False)


def file_stat(path: str | Path) -> FileStat:
    """The ``FileStat`` of ``path`` now, links followed; raises ``OSError`` as ``os.stat``."""
    real = os.path.realpath(path)
    seen = time.time_ns()
    status = os.stat(real)
    return FileStat(
        path=real,
        device=status.st_dev,
        inode=status.st_ino,
        size=status.st_size,
        mtime_ns=status.st_mtime_ns,
        ctime_ns=status.st_ctime_ns,
        regular=stat_module.S_ISREG(status.st_mode),
        seen_ns=seen,
    )


def hash_unchanged(path: str | Path, before: FileStat) -> tuple[str, bool]:
    """The file's SHA-256 (``hash_file`` of ``before.path``) and whether its stat after the read
    is still ``before`` (taken before it): only then may the digest be remembered under it.
    Raises ``OSError`` as ``hash_file`` does; a file gone after the read is "changed"."""
    sha256 = hash_file(before.path)
    try:
        return sha256, file_stat(path) == before
    except OSError:
        return sha256, False


class FileDigests(Protocol):
    """Something that gives a file's SHA-256, possibly from memory instead of reading it.

    ``digest`` must return exactly what ``hash_file`` would for the file as it is now; it raises
    ``OSError`` as ``hash_file`` does. A lab lends its own (``store.digests.StoredDigests``).
    """

    def digest(self, path: str | Path) -> str: ...


class HashEveryTime:
    """``FileDigests`` without memory: every call reads the file (when no lab lends its own)."""

    def digest(self, path: str | Path) -> str:
        return hash_file(path)
