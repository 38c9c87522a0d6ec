"""Remembered weights digests: the digest of a model loaded from files, not computed again.

An embedder's fingerprint covers ``hash_state_dict`` of its image tower, which reads every tensor
(about 1 s for ViT-L/14 on a CPU), and every command that loads the embedder paid it. Those
tensors are a function of the files the model was loaded from and of how it was loaded, so the
digest can be remembered under a key made of exactly that: the SHA-256 of each file read (asked
of the lab's ``hashing.FileDigests``, which knows an unchanged file without reading it) and
``context``, what the loader adds (its version constant, the library versions, the model config,
the precision, the device type). Equal keys mean equal inputs to the same code, hence equal
tensors: a row never needs to be invalidated, only the version constant bumped when the loading
code changes what it makes of the same files.

Two rules keep a key true to the tensors actually loaded: every file's stat is taken before the
load and again after its digest, and the memory is used only when they are equal (a file changed
meanwhile means the tensors are hashed); and the memory itself trusts only stats old enough to
rule out a same-tick rewrite (``store.digests.settled``). The memory is an optimisation: without
one, or when it cannot be read or written, the digest is computed as it always was.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from resynth_index.hashing import FileDigests, FileStat, combine, file_stat, hash_json
from resynth_index.models import fingerprints


@runtime_checkable
class WeightsDigests(Protocol):
    """A memory of weights digests keyed by a digest of what determined them (see the module
    notes). ``files`` are the stats of the files the weights came from, taken before they were
    read: a memory may refuse to recall or record for files it does not trust yet. Neither
    method raises for the memory itself (one that cannot be read recalls nothing)."""

    def recall(self, key: str, files: Sequence[FileStat]) -> str | None: ...

    def record(self, key: str, digest: str, files: Sequence[FileStat]) -> None: ...


def stats_before_loading(
    files: Sequence[Path], digests: FileDigests | None
) -> list[FileStat] | None:
    """The stats of ``files`` taken now, before they are loaded, when ``digests`` also remembers
    weights digests and there are files; None otherwise (the digest will be computed)."""
    if not files or not isinstance(digests, WeightsDigests):
        return None
    try:
        return [file_stat(path) for path in files]
    except OSError:
        return None


def weights_digest(
    module: Any,
    *,
    files: Sequence[Path],
    before: Sequence[FileStat] | None,
    context: Sequence[str],
    digests: FileDigests | None,
) -> str:
    """``hash_state_dict(module.state_dict())``, recalled from ``digests`` when it remembers it
    for these files (their stats ``before`` loading, from ``stats_before_loading``) and
    ``context``, else computed and recorded there."""
    if before is None or not isinstance(digests, WeightsDigests):
        return fingerprints.hash_state_dict(module.state_dict())
    key = load_key(files, before, context, digests)
    if key is not None:
        found = digests.recall(key, before)
        if found is not None:
            return found
    digest = fingerprints.hash_state_dict(module.state_dict())
    if key is not None:
        digests.record(key, digest, before)
    return digest


def load_key(
    files: Sequence[Path], before: Sequence[FileStat], context: Sequence[str], digests: FileDigests
) -> str | None:
    """The memory's key for weights loaded from ``files`` in ``context``: each file's name and
    SHA-256, in order, after the context. None when a file cannot be read or is not the one it
    was before loading (its bytes may not be those loaded)."""
    try:
        entries = [[path.name, digests.digest(path)] for path in files]
        after = [file_stat(path) for path in files]
    except OSError:
        return None
    if after != list(before):
        return None
    return combine(*context, hash_json(entries))
