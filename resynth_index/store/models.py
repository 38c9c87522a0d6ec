"""The lab's tables (SQLAlchemy 2.0 typed models). SQLite is the source of truth.

Every table with an integer id uses SQLite's AUTOINCREMENT: an id is never handed out twice, even
after its row is deleted, because the vector index's watermark and audit ids rely on that.

Every migration in ``migrations/versions`` must leave the database matching these models;
``tests/test_migrations.py`` checks that with Alembic's comparison.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class GeneratorRow(Base):
    """A candidate source generator: one the lab can run (diffusers, toy) or an imported service."""

    __tablename__ = "generators"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # diffusers | toy | imported
    source: Mapped[str | None] = mapped_column(
        Text
    )  # pipeline folder / checkpoint; None if imported
    settings_json: Mapped[str] = mapped_column(Text)  # GenerationSettings + resyntheses per caption
    fingerprint: Mapped[str] = mapped_column(String(64))
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class CaptionRow(Base):
    """A description, keyed by the hash of its normalised text."""

    __tablename__ = "captions"

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImageRow(Base):
    """An image the lab has seen; its bytes live in the blob store under their SHA-256."""

    __tablename__ = "images"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    blob_path: Mapped[str] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ResynthesisRow(Base):
    """An image made (or, for imported generators, supplied) by a generator from a caption."""

    __tablename__ = "resyntheses"
    __table_args__ = (
        UniqueConstraint("generator_id", "caption_hash", "settings_hash", "seed"),
        Index("ix_resyntheses_caption", "caption_hash", "generator_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    generator_id: Mapped[int] = mapped_column(ForeignKey("generators.id"))
    caption_hash: Mapped[str] = mapped_column(ForeignKey("captions.hash"))
    seed: Mapped[int] = mapped_column(Integer)
    settings_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReferenceRow(Base):
    """An image whose true generator is known (few-shot references, evaluation queries)."""

    __tablename__ = "references"
    __table_args__ = (
        UniqueConstraint("image_id", "generator_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    generator_id: Mapped[int] = mapped_column(ForeignKey("generators.id"))
    caption_hash: Mapped[str | None] = mapped_column(ForeignKey("captions.hash"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EmbeddingRow(Base):
    """An image's feature vector from one embedder (float32 little-endian BLOB)."""

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("image_id", "embedder_fingerprint"),
        Index("ix_embeddings_fingerprint_id", "embedder_fingerprint", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    embedder_fingerprint: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class QueryRow(Base):
    """The audit record of one attribution: enough to reproduce and defend the answer."""

    __tablename__ = "queries"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_path: Mapped[str] = mapped_column(Text)
    caption_hash: Mapped[str] = mapped_column(ForeignKey("captions.hash"))
    caption_source: Mapped[str] = mapped_column(String(200))
    candidates_json: Mapped[str] = mapped_column(Text)
    fingerprints_json: Mapped[str] = mapped_column(Text)  # embedder + every candidate generator
    distances_json: Mapped[str] = mapped_column(Text)  # per generator: every resynthesis distance
    verdict: Mapped[str] = mapped_column(String(128))
    result_json: Mapped[str] = mapped_column(Text)  # the full answer as reported


class PendingResynthesisRow(Base):
    """A work order: an imported generator lacks a resynthesis of a caption some query needed."""

    __tablename__ = "pending_resyntheses"
    __table_args__ = (
        UniqueConstraint("generator_id", "caption_hash"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generator_id: Mapped[int] = mapped_column(ForeignKey("generators.id"))
    caption_hash: Mapped[str] = mapped_column(ForeignKey("captions.hash"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CalibrationRow(Base):
    """A calibration of prediction sets (``rsx calibrate``), kept for audit once superseded.

    ``record_json`` is the calibration itself (``Calibration.to_dict`` of
    ``attribution.calibration.conformal``):
    thresholds, fitted temperature, the reference ids used, every fingerprint, the scoring
    settings. ``settings_json`` holds what else a query must match to use it (resyntheses per
    generator); ``summary_json`` what ``rsx calibrate`` reported (references per generator, ECE).
    ``candidates_json`` is the sorted candidate set, as JSON: a newer calibration of the same
    set supersedes this one (``superseded_by``), and queries use the newest active one.
    """

    __tablename__ = "calibrations"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    method: Mapped[str] = mapped_column(String(32))
    coverage: Mapped[float] = mapped_column(Float)
    per_generator: Mapped[bool] = mapped_column(Boolean)
    candidates_json: Mapped[str] = mapped_column(Text)
    embedder_fingerprint: Mapped[str] = mapped_column(String(64))
    record_json: Mapped[str] = mapped_column(Text)
    settings_json: Mapped[str] = mapped_column(Text)
    summary_json: Mapped[str] = mapped_column(Text)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("calibrations.id"))


class FileDigestRow(Base):
    """The SHA-256 of a file the lab has read, remembered so the next command need not read it.

    Keyed by the file's real path; the digest holds only while the file's device, inode, size,
    mtime and ctime are those recorded (``hashing.FileStat``). Device and inode are stored as
    signed 64-bit values (an unsigned one above 2**63 wraps to a negative one), so BigInteger
    fits them on both engines. Derived data: a lost row only costs one more read of the file.
    """

    __tablename__ = "file_digests"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    device: Mapped[int] = mapped_column(BigInteger)
    inode: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    ctime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WeightsDigestRow(Base):
    """The digest of a model's weights as loaded (``hash_state_dict``), remembered so the next
    load need not read every tensor to compute it (``models/weights_digests.py``).

    Keyed by a digest of everything that determines it: the SHA-256 of each file loaded, the
    loader's version, the library versions, model config, precision and device type. Equal keys
    mean equal tensors, so a row is never invalidated (a new loader version makes new keys).
    Derived data: a lost row only costs one more computation.
    """

    __tablename__ = "weights_digests"

    load_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
