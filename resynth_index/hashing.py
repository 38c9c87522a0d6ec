"""Content hashes: the SHA-256 digests that name images, blobs, settings and model files.

Content addressing is how the lab recognises what it has seen (DESIGN.md, principle 2), so every
digest is made here, once: of bytes, of a file or an open stream read in chunks (a checkpoint may
be gigabytes), and of JSON in one canonical form (sorted keys, no whitespace) so that equal
settings always give the same digest. A foundation module: the store, the media parsers and the
model backends all use it, and it imports nothing of rsx.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

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
