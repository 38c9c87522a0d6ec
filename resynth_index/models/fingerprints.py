"""Content fingerprints: stable SHA-256 digests of settings, files and model weights.

A fingerprint must change whenever what it describes changes, and only then: settings are hashed
as canonical JSON (sorted keys, no whitespace), weights tensor by tensor (name, dtype, shape, bytes)
so the same weights give the same digest whether they came from a file, a folder or memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """JSON text that is identical for equal objects (sorted keys, compact separators)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def hash_json(obj: Any) -> str:
    """SHA-256 hex digest of ``obj`` as canonical JSON."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_state_dict(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 over a torch state dict: every tensor's name, dtype, shape and raw bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().contiguous().cpu()
        digest.update(name.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("ascii"))
        digest.update(repr(tuple(tensor.shape)).encode("ascii"))
        # view as bytes: works for every dtype, bf16 included, without a numpy round trip
        digest.update(tensor.reshape(-1).view(dtype=_uint8()).numpy().tobytes())
    return digest.hexdigest()


def _uint8():
    import torch

    return torch.uint8


def combine(*parts: str) -> str:
    """One digest from several (order matters)."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
