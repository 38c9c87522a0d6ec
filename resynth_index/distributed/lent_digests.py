"""The coordinator's digests, lent to Ray actors so that they do not hash unchanged weights again.

An actor rebuilds its generator (or embedder) from files on its own node, and a generator's
fingerprint needs the SHA-256 of every weight file: seconds for a 4 GB pipeline, paid by every
actor of every run. The coordinator's lab remembers those digests (``store/digests.py``), but an
actor has no database. So the coordinator sends, with the work, the entries it knows (``FileStat``
and SHA-256) for the files the model loads, and the actor trusts an entry only while the file's
stat there equals the recorded one exactly: the same node and disk (device), the same file
(inode) and the same version of it (size, mtime, ctime). On another node, or for a file changed
since, the actor reads the file as it always did.

An embedder actor also gets the lab's most recent weights digests: their keys are made of file
contents, not paths (``models/weights_digests.py``), so a hit is right on any node.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from resynth_index import hashing
from resynth_index.errors import RsxError
from resynth_index.hashing import FileStat, file_stat
from resynth_index.store.digests import StoredDigests, settled

if TYPE_CHECKING:
    from resynth_index.models.embedders import EmbedderSpec

#: How many weights digests a coordinator lends (the newest): one per embedder, precision and
#: device type the lab has loaded, so a handful in practice.
LENT_WEIGHTS = 32

FileEntries = tuple[tuple[FileStat, str], ...]


def lend_files(memory: StoredDigests, files: Iterable[Path]) -> FileEntries:
    """The entries ``memory`` knows for ``files`` as they are now on this node (a file it does
    not know, or that cannot be stat'ed here, is left for the actor to read)."""
    stats = []
    for path in files:
        try:
            stats.append(file_stat(path))
        except OSError:
            continue
    known = memory.known(stats)
    return tuple((stat, known[stat]) for stat in stats if stat in known)


def lend_generator(
    memory: StoredDigests, kind: str, source: Path | None, settings_json: str
) -> FileEntries:
    """What ``memory`` knows of the files a generator's fingerprint reads (none for an imported
    generator, or settings that cannot be read: the actor then reads them, or fails itself)."""
    from resynth_index.models.generators.diffusers import fingerprint_files

    if kind == "imported" or source is None:
        return ()
    try:
        config = json.loads(settings_json).get("config")
    except (ValueError, AttributeError):
        return ()
    return lend_files(memory, fingerprint_files(source, config))


def lend_embedder(memory: StoredDigests, spec: EmbedderSpec) -> tuple[FileEntries, dict[str, str]]:
    """What ``memory`` knows of the embedder's weight files, and the lab's newest remembered
    weights digests (key -> digest)."""
    from resynth_index.models.embedders import weight_files

    try:
        files = weight_files(spec)
    except RsxError:  # the actors say so, with their own view of the files
        files = ()
    return lend_files(memory, files), memory.latest_weights(LENT_WEIGHTS)


class LentDigests:
    """``hashing.FileDigests`` (and ``models.weights_digests.WeightsDigests``) in an actor: the
    coordinator's entries where the file is exactly the one they were taken of, else a read.

    ``hashed`` lists the files it read (the real paths), so a run can tell what its actors paid.
    Weights digests recorded here live as long as the actor.
    """

    def __init__(
        self, files: Iterable[tuple[FileStat, str]] = (), weights: Mapping[str, str] | None = None
    ) -> None:
        self._files = dict(files)
        self._weights = dict(weights or {})
        self.hashed: list[str] = []

    def digest(self, path: str | Path) -> str:
        """The file's SHA-256 as ``hashing.hash_file`` gives it; raises ``OSError`` as it does."""
        stat = file_stat(path)
        known = self._files.get(stat)  # equal stats: every field but the time it was taken
        if known is not None:
            return known
        self.hashed.append(stat.path)
        return hashing.hash_file(stat.path)

    def recall(self, key: str, files: Sequence[FileStat]) -> str | None:
        return self._weights.get(key) if all(settled(stat) for stat in files) else None

    def record(self, key: str, digest: str, files: Sequence[FileStat]) -> None:
        if all(settled(stat) for stat in files):
            self._weights[key] = digest
