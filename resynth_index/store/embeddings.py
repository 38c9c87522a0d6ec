"""The embeddings table: each image's vector per embedder fingerprint, and the questions about it.

Vectors are stored as little-endian float32 BLOBs whatever the host, with their dimension and the
fingerprint of the embedder that made them; embeddings of different embedders are never mixed.
Like ``repository``, every function takes the caller's ``Session``; ``EmbeddingFeed`` (what the
vector index reads) opens a short session of its own for each question.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from resynth_index.store.engine import in_chunks, insert_ignore_many
from resynth_index.store.models import EmbeddingRow, ImageRow, utcnow

VECTOR_DTYPE = np.dtype("<f4")  # little-endian float32, whatever the host

# The questions a query asks each time, built once: a statement made anew costs more to build
# and to find in SQLAlchemy's compiled cache than the SQLite lookup itself (0.53 against 0.26 ms
# for ``embedding_ids`` of a few images on the 2-core VM). The ids travel as expanding lists.
_IDS_OF_IMAGES = select(EmbeddingRow.image_id, EmbeddingRow.id).where(
    EmbeddingRow.embedder_fingerprint == bindparam("fingerprint"),
    EmbeddingRow.image_id.in_(bindparam("ids", expanding=True)),
)
_EMBEDDED_SHAS = (
    select(ImageRow.sha256)
    .join(EmbeddingRow, EmbeddingRow.image_id == ImageRow.id)
    .where(
        EmbeddingRow.embedder_fingerprint == bindparam("fingerprint"),
        ImageRow.sha256.in_(bindparam("shas", expanding=True)),
    )
)
_VECTORS = select(EmbeddingRow.id, EmbeddingRow.dim, EmbeddingRow.vector).where(
    EmbeddingRow.id.in_(bindparam("ids", expanding=True))
)
_VECTORS_OF = _VECTORS.where(EmbeddingRow.embedder_fingerprint == bindparam("fingerprint"))


def vector_to_blob(vector: np.ndarray) -> bytes:
    """The stored form of a vector (little-endian float32 bytes)."""
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


def blob_to_vector(blob: bytes, dim: int) -> np.ndarray:
    """A stored vector back as float32; a BLOB of the wrong length raises ``ValueError``."""
    vector = np.frombuffer(blob, dtype=VECTOR_DTYPE)
    if vector.shape[0] != dim:
        raise ValueError(f"stored vector has {vector.shape[0]} values, expected {dim}")
    return vector.astype(np.float32)


def add_embeddings(
    session: Session, fingerprint: str, image_ids: Sequence[int], vectors: np.ndarray
) -> None:
    """Store one vector per image for this embedder (images already embedded are left as is)."""
    if not len(image_ids):
        return
    insert_ignore_many(
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


def embedding_ids(session: Session, image_ids: Iterable[int], fingerprint: str) -> dict[int, int]:
    """image id -> embedding id, for the images embedded by this embedder."""
    found: dict[int, int] = {}
    for ids in in_chunks(image_ids):
        rows = session.execute(_IDS_OF_IMAGES, {"fingerprint": fingerprint, "ids": ids})
        found.update({image_id: embedding_id for image_id, embedding_id in rows})
    return found


def embedded_sha256s(session: Session, sha256s: Sequence[str], fingerprint: str) -> set[str]:
    """Which of these images (by content hash) this embedder has embedded."""
    found: set[str] = set()
    for shas in in_chunks(sha256s):
        found.update(session.scalars(_EMBEDDED_SHAS, {"fingerprint": fingerprint, "shas": shas}))
    return found


def vectors_by_embedding_id(
    session: Session, embedding_ids: Iterable[int], fingerprint: str | None = None
) -> dict[int, np.ndarray]:
    """embedding id -> stored vector, for those of ``embedding_ids`` that exist (and, with
    ``fingerprint``, that this embedder stored).

    What a query reads instead of opening the vector index: primary-key lookups, so k ids cost
    O(k log N) however many vectors the lab holds, where opening the index file reads, hashes
    and may rewrite all N. The vectors are the stored float32 values, bit for bit the ones the
    index holds (it is built from these rows), so an answer does not depend on which was read.
    """
    found: dict[int, np.ndarray] = {}
    for ids in in_chunks(int(i) for i in embedding_ids):
        rows = (
            session.execute(_VECTORS, {"ids": ids})
            if fingerprint is None
            else session.execute(_VECTORS_OF, {"ids": ids, "fingerprint": fingerprint})
        )
        found.update({row.id: blob_to_vector(row.vector, row.dim) for row in rows})
    return found


def vectors_by_image_id(
    session: Session, image_ids: Sequence[int], fingerprint: str
) -> dict[int, np.ndarray]:
    """image id -> this embedder's vector of it, for the images it has embedded."""
    found: dict[int, np.ndarray] = {}
    for ids in in_chunks(image_ids):
        rows = session.execute(
            select(EmbeddingRow.image_id, EmbeddingRow.dim, EmbeddingRow.vector).where(
                EmbeddingRow.embedder_fingerprint == fingerprint, EmbeddingRow.image_id.in_(ids)
            )
        )
        found.update({row.image_id: blob_to_vector(row.vector, row.dim) for row in rows})
    return found


def embedding_stats(session: Session, fingerprint: str) -> tuple[int, int]:
    """(count, max id) of this embedder's embeddings; max id is -1 when there are none."""
    count, top = session.execute(
        select(func.count(EmbeddingRow.id), func.max(EmbeddingRow.id)).where(
            EmbeddingRow.embedder_fingerprint == fingerprint
        )
    ).one()
    return int(count), -1 if top is None else int(top)


def all_embedding_ids(session: Session, fingerprint: str) -> np.ndarray:
    """Every embedding id of this embedder (int64, 8 bytes each), to compare with an index's."""
    ids = session.scalars(
        select(EmbeddingRow.id).where(EmbeddingRow.embedder_fingerprint == fingerprint)
    )
    return np.fromiter(ids, dtype=np.int64)


def embedding_count(session: Session, fingerprint: str, lower: int, upper: int) -> int:
    """How many embeddings this embedder has stored with lower < id <= upper."""
    count = session.scalar(
        select(func.count(EmbeddingRow.id)).where(
            EmbeddingRow.embedder_fingerprint == fingerprint,
            EmbeddingRow.id > lower,
            EmbeddingRow.id <= upper,
        )
    )
    return int(count or 0)


def embedding_ids_between(session: Session, fingerprint: str, lower: int, upper: int) -> np.ndarray:
    """This embedder's embedding ids with lower < id <= upper (int64; ids only, no vectors)."""
    rows = session.execute(
        select(EmbeddingRow.id).where(
            EmbeddingRow.embedder_fingerprint == fingerprint,
            EmbeddingRow.id > lower,
            EmbeddingRow.id <= upper,
        )
    ).all()
    return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))


def iter_embeddings_by_id(
    session: Session, fingerprint: str, ids: Iterable[int]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of (ids, vectors) of those of ``ids`` this embedder has stored, in id order."""
    for chunk in in_chunks(sorted(int(i) for i in ids)):
        rows = session.execute(
            select(EmbeddingRow.id, EmbeddingRow.dim, EmbeddingRow.vector)
            .where(EmbeddingRow.embedder_fingerprint == fingerprint, EmbeddingRow.id.in_(chunk))
            .order_by(EmbeddingRow.id)
        ).all()
        if rows:
            found = np.fromiter((row.id for row in rows), dtype=np.int64, count=len(rows))
            yield found, np.stack([blob_to_vector(row.vector, row.dim) for row in rows])


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


def images_without_embedding(session: Session, fingerprint: str) -> list[int]:
    """Ids of the stored images this embedder has not embedded (``rsx check`` completes them)."""
    embedded = select(EmbeddingRow.image_id).where(EmbeddingRow.embedder_fingerprint == fingerprint)
    return list(session.scalars(select(ImageRow.id).where(ImageRow.id.not_in(embedded))))


def wrong_dimension_count(session: Session, fingerprint: str, dim: int) -> int:
    """How many of this embedder's embeddings do not have ``dim`` values."""
    count = session.scalar(
        select(func.count(EmbeddingRow.id)).where(
            EmbeddingRow.embedder_fingerprint == fingerprint, EmbeddingRow.dim != dim
        )
    )
    return int(count or 0)


class EmbeddingFeed:
    """One embedder's stored embeddings as the vector index reads them: an ``EmbeddingSource``
    (called with a watermark) and a ``StoredEmbeddings`` (count, ids, fetch by id), each question
    answered in a session of its own, so every answer sees what is committed when it is asked."""

    def __init__(self, sessions: Callable[[], Session], fingerprint: str) -> None:
        """``sessions`` makes a new session (the lab's sessionmaker)."""
        self._sessions = sessions
        self.fingerprint = fingerprint

    def __call__(self, after_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored embedding with id > after_id, in batches in id order."""
        with self._sessions() as session:
            yield from iter_embeddings(session, self.fingerprint, after_id)

    def count(self, lower: int, upper: int) -> int:
        """How many embeddings with lower < id <= upper are stored now."""
        with self._sessions() as session:
            return embedding_count(session, self.fingerprint, lower, upper)

    def ids(self, lower: int, upper: int) -> np.ndarray:
        """The stored embedding ids with lower < id <= upper (ids only: 8 bytes a row)."""
        with self._sessions() as session:
            return embedding_ids_between(session, self.fingerprint, lower, upper)

    def fetch(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Those of ``ids`` that are stored, with their vectors, in batches in id order."""
        with self._sessions() as session:
            yield from iter_embeddings_by_id(session, self.fingerprint, ids.tolist())
