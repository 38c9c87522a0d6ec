"""Store operations the rest of the lab uses: idempotent inserts and the lookups the method needs.

All inserts are ON CONFLICT DO NOTHING followed by a lookup, so two processes ingesting the same
file at once both end with the one row, and a re-run after a crash is a no-op for what landed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from resynth_index.store.engine import insert_ignore
from resynth_index.store.models import (
    CaptionRow,
    EmbeddingRow,
    GeneratorRow,
    ImageRow,
    PendingResynthesisRow,
    ReferenceRow,
    ResynthesisRow,
    utcnow,
)

VECTOR_DTYPE = np.dtype("<f4")  # little-endian float32, whatever the host


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


def blob_to_vector(blob: bytes, dim: int) -> np.ndarray:
    vector = np.frombuffer(blob, dtype=VECTOR_DTYPE)
    if vector.shape[0] != dim:
        raise ValueError(f"stored vector has {vector.shape[0]} values, expected {dim}")
    return vector.astype(np.float32)


def ensure_image(
    session: Session,
    *,
    sha256: str,
    blob_path: str,
    size_bytes: int,
    fmt: str,
    width: int,
    height: int,
) -> tuple[int, bool]:
    """Return (image id, True if this call added it)."""
    result = insert_ignore(
        session,
        ImageRow,
        {
            "sha256": sha256,
            "blob_path": blob_path,
            "size_bytes": size_bytes,
            "format": fmt,
            "width": width,
            "height": height,
            "created_at": utcnow(),
        },
        ["sha256"],
    )
    image_id = session.scalar(select(ImageRow.id).where(ImageRow.sha256 == sha256))
    return image_id, bool(result.rowcount)


def ensure_caption(session: Session, caption_hash: str, text: str) -> None:
    insert_ignore(
        session, CaptionRow, {"hash": caption_hash, "text": text, "created_at": utcnow()}, ["hash"]
    )


def caption_text(session: Session, caption_hash: str) -> str | None:
    return session.scalar(select(CaptionRow.text).where(CaptionRow.hash == caption_hash))


def generator_by_name(session: Session, name: str) -> GeneratorRow | None:
    return session.scalar(select(GeneratorRow).where(GeneratorRow.name == name))


def active_generators(session: Session) -> list[GeneratorRow]:
    return list(
        session.scalars(
            select(GeneratorRow)
            .where(GeneratorRow.retired_at.is_(None))
            .order_by(GeneratorRow.name)
        )
    )


def ensure_resynthesis(
    session: Session,
    *,
    image_id: int,
    generator_id: int,
    caption_hash: str,
    seed: int,
    settings_hash: str,
) -> bool:
    """Record a resynthesis; True when it is new."""
    result = insert_ignore(
        session,
        ResynthesisRow,
        {
            "image_id": image_id,
            "generator_id": generator_id,
            "caption_hash": caption_hash,
            "seed": seed,
            "settings_hash": settings_hash,
            "created_at": utcnow(),
        },
        ["generator_id", "caption_hash", "settings_hash", "seed"],
    )
    return bool(result.rowcount)


def next_free_seed(
    session: Session, generator_id: int, caption_hash: str, settings_hash: str
) -> int:
    """For imported resyntheses, which have no seed: the next ordinal for this caption."""
    top = session.scalar(
        select(func.max(ResynthesisRow.seed)).where(
            ResynthesisRow.generator_id == generator_id,
            ResynthesisRow.caption_hash == caption_hash,
            ResynthesisRow.settings_hash == settings_hash,
        )
    )
    return 0 if top is None else top + 1


def resynthesis_image_for(
    session: Session, *, generator_id: int, caption_hash: str, settings_hash: str, image_id: int
) -> bool:
    """True when this exact image is already a resynthesis of that caption by that generator."""
    return (
        session.scalar(
            select(ResynthesisRow.id).where(
                ResynthesisRow.generator_id == generator_id,
                ResynthesisRow.caption_hash == caption_hash,
                ResynthesisRow.settings_hash == settings_hash,
                ResynthesisRow.image_id == image_id,
            )
        )
        is not None
    )


def ensure_reference(
    session: Session, *, image_id: int, generator_id: int, caption_hash: str | None
) -> bool:
    result = insert_ignore(
        session,
        ReferenceRow,
        {
            "image_id": image_id,
            "generator_id": generator_id,
            "caption_hash": caption_hash,
            "created_at": utcnow(),
        },
        ["image_id", "generator_id"],
    )
    return bool(result.rowcount)


def stored_resyntheses(
    session: Session, caption_hashes: Sequence[str], generator_ids: Sequence[int]
) -> list[ResynthesisRow]:
    if not caption_hashes or not generator_ids:
        return []
    return list(
        session.scalars(
            select(ResynthesisRow)
            .where(
                ResynthesisRow.caption_hash.in_(list(caption_hashes)),
                ResynthesisRow.generator_id.in_(list(generator_ids)),
            )
            .order_by(ResynthesisRow.id)
        )
    )


def embedding_ids(session: Session, image_ids: Iterable[int], fingerprint: str) -> dict[int, int]:
    """image id -> embedding id, for the images embedded by this embedder."""
    ids = list(set(image_ids))
    found: dict[int, int] = {}
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(EmbeddingRow.image_id, EmbeddingRow.id).where(
                EmbeddingRow.embedder_fingerprint == fingerprint,
                EmbeddingRow.image_id.in_(ids[start : start + 500]),
            )
        )
        found.update({image_id: embedding_id for image_id, embedding_id in rows})
    return found


def add_embeddings(
    session: Session, fingerprint: str, image_ids: Sequence[int], vectors: np.ndarray
) -> None:
    if not len(image_ids):
        return
    insert_ignore(
        session,
        EmbeddingRow,
        [
            {
                "image_id": image_id,
                "embedder_fingerprint": fingerprint,
                "dim": int(vector.shape[0]),
                "vector": vector_to_blob(vector),
                "created_at": utcnow(),
            }
            for image_id, vector in zip(image_ids, vectors, strict=True)
        ],
        ["image_id", "embedder_fingerprint"],
    )


def embedding_stats(session: Session, fingerprint: str) -> tuple[int, int]:
    """(count, max id) of this embedder's embeddings; max id is -1 when there are none."""
    count, top = session.execute(
        select(func.count(EmbeddingRow.id), func.max(EmbeddingRow.id)).where(
            EmbeddingRow.embedder_fingerprint == fingerprint
        )
    ).one()
    return int(count), -1 if top is None else int(top)


def iter_embeddings(
    session: Session, fingerprint: str, after_id: int, batch: int = 10_000
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of (ids, vectors) with id > after_id, in id order (the vector index's source)."""
    last = after_id
    while True:
        rows = session.execute(
            select(EmbeddingRow.id, EmbeddingRow.dim, EmbeddingRow.vector)
            .where(EmbeddingRow.embedder_fingerprint == fingerprint, EmbeddingRow.id > last)
            .order_by(EmbeddingRow.id)
            .limit(batch)
        ).all()
        if not rows:
            return
        ids = np.fromiter((row.id for row in rows), dtype=np.int64, count=len(rows))
        vectors = np.stack([blob_to_vector(row.vector, row.dim) for row in rows])
        yield ids, vectors
        last = int(ids[-1])


def add_pending(session: Session, generator_id: int, caption_hash: str) -> None:
    insert_ignore(
        session,
        PendingResynthesisRow,
        {"generator_id": generator_id, "caption_hash": caption_hash, "created_at": utcnow()},
        ["generator_id", "caption_hash"],
    )
