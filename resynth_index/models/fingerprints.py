"""Model fingerprints: stable SHA-256 digests of settings, files and model weights.

A fingerprint must change whenever what it describes changes, and only then: settings are hashed
as canonical JSON (sorted keys, no whitespace), weights tensor by tensor (name, dtype, shape, bytes)
so the same weights give the same digest whether they came from a file, a folder or memory. The
generic digests (bytes, files, canonical JSON) are ``resynth_index.hashing``'s, re-exported here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

# the generic digests live in the foundation module; they are re-exported here for the backends
from resynth_index.hashing import canonical_json, combine, hash_bytes, hash_file, hash_json

__all__ = ["canonical_json", "combine", "hash_bytes", "hash_file", "hash_json", "hash_state_dict"]


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
