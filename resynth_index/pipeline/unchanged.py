"""Ingest items the lab holds already, found by a stat of each file instead of a read of it.

A second ``rsx ingest`` of a folder should cost a stat per file, not a read, a hash and a decode.
The lab remembers the digest of every file it ingested (``store/digests.py``, keyed by real path,
device, inode, size, mtime and ctime); a file whose stat matches its row is taken to hold those
bytes, and is skipped, unopened, when storing it again would write nothing: exactly the case the
full path reports as "skipped (already present)". That is, when

* the image with that digest has its row, its blob (with the stat remembered when ingest last
  wrote or verified it: a blob rewritten, truncated, replaced or removed since is restored by the
  full path), the lab's embedding of it, and fits the lab's ``max_pixels`` as it stands;
* and its role asks for nothing the store lacks. A query: the caption's row, when one is given.
  A reference: the generator's reference of that image, and the row of the caption the item
  names (explicitly or in a sidecar file); with neither, the reference must have no caption,
  since one stored from the image's embedded metadata cannot be told apart without reading it.
  A resynthesis: that image in the slot (generator, caption, settings, the seed when one is
  given), its caption given explicitly or in a sidecar file.

Anything else (no remembered digest, a changed stat, a role or caption that would add a row, a
missing blob or embedding) is left to the full path, which reads the file and verifies it by its
content hash as before. What a skip does not look at: the blob's bytes (bytes that rot without a
change of stat are ``rsx check``'s to find, and ``rsx ingest --reread``'s to restore) and the
image's decoding (it decoded when it was stored).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from resynth_index.errors import RsxError
from resynth_index.hashing import FileStat, file_stat
from resynth_index.media.captions import caption_hash, normalise_caption, sidecar_text
from resynth_index.media.images import DEFAULT_MAX_BYTES
from resynth_index.models.generators import factory
from resynth_index.store import digests, repository
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from resynth_index.lab import Lab
    from resynth_index.pipeline.ingest_items import IngestItem


def unchanged_items(lab: Lab, items: Sequence[IngestItem]) -> set[int]:
    """The positions in ``items`` of the files stored already and unchanged since (see the
    module notes); none of them is opened. A file that cannot be examined is left to the full
    path, which says what is wrong with it."""
    stats: dict[int, FileStat] = {}
    for position, item in enumerate(items):
        try:
            stat = file_stat(item.path)
        except OSError:
            continue
        if stat.regular and 0 < stat.size <= DEFAULT_MAX_BYTES:
            stats[position] = stat
    known = lab.file_digests.known(list(stats.values()))
    if not known:
        return set()
    sha_of = {position: known[stat] for position, stat in stats.items() if stat in known}
    unchanged: set[int] = set()
    with lab.session() as session:
        images = digests.stored_images(session, set(sha_of.values()), lab.fingerprint)
        judge = _Judge(lab, session, images, _intact_blobs(lab, images))
        for position, sha256 in sha_of.items():
            if judge.stored(items[position], sha256):
                unchanged.add(position)
    return unchanged


def _intact_blobs(lab: Lab, images: dict[str, digests.StoredImage]) -> set[str]:
    """The digests among ``images`` whose blob has the size recorded and the stat remembered
    when it was last written or verified (one stat a blob; no blob is read)."""
    stats: dict[str, FileStat] = {}
    for sha256, image in images.items():
        try:
            stat = file_stat(lab.blobs.path_for(sha256))
        except (OSError, ValueError):  # missing, or a digest no blob can be named by
            continue
        if stat.size == image.size_bytes:
            stats[sha256] = stat
    known = lab.file_digests.known(list(stats.values()))
    return {sha256 for sha256, stat in stats.items() if known.get(stat) == sha256}


class _Judge:
    """Whether an item would add nothing to the store; the reads of one ingest, in one session."""

    def __init__(
        self,
        lab: Lab,
        session: Session,
        images: dict[str, digests.StoredImage],
        intact_blobs: set[str],
    ) -> None:
        self.lab = lab
        self.session = session
        self.images = images
        self.intact_blobs = intact_blobs
        self.generators: dict[str, GeneratorRow | None] = {}
        self.captions: dict[str, bool] = {}  # caption hash -> has a row
        self.references: dict[tuple[int, int], str | None] = {}  # (generator, image) -> caption
        self.referenced: set[int] = set()  # generators whose references were read

    def stored(self, item: IngestItem, sha256: str) -> bool:
        image = self.images.get(sha256)
        if image is None or not image.embedded or sha256 not in self.intact_blobs:
            return False
        if image.width * image.height > self.lab.settings.max_pixels:
            return False  # the full path would refuse it now: let it say so
        text = item.caption
        if text is None and item.role != "query":
            try:
                found = sidecar_text(item.path)
            except RsxError:  # an unreadable sidecar: the full path says what is wrong
                return False
            text = found[0] if found else None
        if text is not None and not normalise_caption(text):
            return False  # a blank caption: refused by the full path
        caption = caption_hash(text) if text is not None else None
        if item.role == "query":
            return caption is None or self._caption_known(caption)
        generator = self._generator(item.generator)
        if generator is None:
            return False
        if item.role == "reference":
            return self._reference_stored(generator, image.image_id, caption)
        if item.role == "resynthesis" and caption is not None:
            return self._resynthesis_stored(item, generator, caption, sha256)
        return False

    def _generator(self, name: str | None) -> GeneratorRow | None:
        if name is None:
            return None
        if name not in self.generators:
            self.generators[name] = repository.generator_by_name(self.session, name)
        return self.generators[name]

    def _caption_known(self, caption: str) -> bool:
        if caption not in self.captions:
            self.captions[caption] = bool(repository.caption_texts(self.session, [caption]))
        return self.captions[caption]

    def _reference_stored(
        self, generator: GeneratorRow, image_id: int, caption: str | None
    ) -> bool:
        if generator.id not in self.referenced:
            ids = [image.image_id for image in self.images.values()]
            found = digests.reference_captions(self.session, generator.id, ids)
            self.references.update({(generator.id, i): c for i, c in found.items()})
            self.referenced.add(generator.id)
        key = (generator.id, image_id)
        if key not in self.references:
            return False
        if caption is None:  # it would come from the image's metadata, unread: none stored
            return self.references[key] is None
        return self._caption_known(caption)

    def _resynthesis_stored(
        self, item: IngestItem, generator: GeneratorRow, caption: str, sha256: str
    ) -> bool:
        settings = factory.settings_hash(generator.kind, generator.settings_json, self.lab.device)
        if item.seed is None and generator.kind != "imported":
            return False  # refused by the full path: a runnable generator's needs its seed
        if item.seed is None:  # an imported generator's: any seed of that slot
            seed = repository.resynthesis_seed_of_image(
                self.session,
                generator_id=generator.id,
                caption_hash=caption,
                settings_hash=settings,
                sha256=sha256,
            )
            return seed is not None
        held = repository.resynthesis_in_slot(
            self.session,
            generator_id=generator.id,
            caption_hash=caption,
            settings_hash=settings,
            seed=item.seed,
        )
        return held is not None and held[1] == sha256
