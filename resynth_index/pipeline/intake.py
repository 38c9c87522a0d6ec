"""How an image enters a lab: a verified blob copy, an ``images`` row, and an embedding.

Ingest, query and resynthesis all store images the same way, in the same order: the blob is
written first (atomically, named by its hash), then the row that points at it, then the embedding.
A crash between steps leaves at worst an orphan blob or an image without an embedding; both are
found by ``rsx check`` and completed by re-running the same command. From the first blob to the
commit of its row a writer holds the blob store's writers' lock (``BlobStore.writing``), so
``rsx check --repair`` never takes a blob in flight for debris.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from resynth_index.media.images import LoadedImage
from resynth_index.store import embeddings, repository
from resynth_index.store.faults import crash_point

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image

    from resynth_index.lab import Lab


def store_images(
    lab: Lab,
    loaded: Sequence[LoadedImage],
    session: Session | None = None,
    *,
    blobs_written: bool = False,
) -> list[tuple[int, bool]]:
    """Store a batch: every blob first, then all their rows in one transaction.

    Returns (image id, newly added) per image, in order. With ``session`` the rows join the
    caller's transaction (so a batch's other rows commit with them): the caller then holds
    ``lab.blobs.writing()`` until that transaction commits. ``blobs_written`` says the caller
    already placed every blob (ingest stages and places them ahead, on its loader).
    """
    if session is None:
        with lab.blobs.writing(), lab.session() as own:
            return store_images(lab, loaded, own, blobs_written=blobs_written)
    if not blobs_written:  # the batch's blobs in place and durable in one step, before rows
        staged = []
        try:
            for item in loaded:
                staged.append(lab.blobs.stage(item.sha256, item.data))
        except BaseException:
            lab.blobs.discard(staged)
            raise
        lab.blobs.place(staged)
    for _item in loaded:
        crash_point("image-row")  # blob stored, no row points at it yet (reached once an image)
    return _image_rows(lab, session, loaded)


def _image_rows(
    lab: Lab, session: Session, loaded: Sequence[LoadedImage]
) -> list[tuple[int, bool]]:
    """The batch's image rows, in one insert for the batch (``repository.ensure_images``)."""
    return repository.ensure_images(
        session,
        [
            repository.ImageRecord(
                sha256=item.sha256,
                blob_path=lab.blobs.relpath_for(item.sha256),
                size_bytes=len(item.data),
                fmt=item.format,
                width=item.width,
                height=item.height,
            )
            for item in loaded
        ],
    )


def encode_png(image: PIL.Image.Image) -> bytes:
    """Lossless, deterministic bytes for a generated image (no timestamps, no metadata)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def ensure_embeddings(
    lab: Lab,
    images: Mapping[int, PIL.Image.Image | None],
    batch_size: int | None = None,
    computed: dict[int, np.ndarray] | None = None,
) -> dict[int, int]:
    """Embed every listed image that the lab's embedder has not embedded yet.

    ``images`` maps image id to its decoded picture, or None to load it from the blob store.
    Returns image id -> embedding id for all of them. ``computed``, when given, receives the
    vectors made here by embedding id (so a caller need not read them back).
    """
    batch_size = batch_size or lab.settings.embedding_batch_size
    with lab.session() as session:
        known = embeddings.embedding_ids(session, images.keys(), lab.fingerprint)
    missing = [image_id for image_id in images if image_id not in known]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        pictures = [_picture(lab, i, images[i]) for i in chunk]
        vectors = lab.embedder.embed(pictures, batch_size=batch_size)
        written = write_embeddings(lab, chunk, vectors)
        known.update(written)
        if computed is not None:
            for image_id, vector in zip(chunk, vectors, strict=True):
                if image_id in written:
                    computed[written[image_id]] = vector
    return known


def _picture(lab: Lab, image_id: int, given: PIL.Image.Image | None) -> PIL.Image.Image:
    return given if given is not None else lab.stored_image(image_id)


def write_embeddings(lab: Lab, image_ids: Sequence[int], vectors: np.ndarray) -> dict[int, int]:
    """Store the vectors the embedder just made for ``image_ids``; image id -> embedding id."""
    crash_point("embedding")  # rows stored, their embeddings not yet
    with lab.session() as session:
        embeddings.add_embeddings(session, lab.fingerprint, image_ids, vectors)
        return embeddings.embedding_ids(session, image_ids, lab.fingerprint)
