"""What a lab holds, counted (``rsx info``): rows per table, bytes on disk, the index file's header.

Read-only and cheap: one COUNT per table, a walk of a folder's sizes, the header of the index file
(its vectors are not loaded, so faiss is not imported and nothing is verified beyond the header).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from resynth_index.errors import StoreError
from resynth_index.store import repository
from resynth_index.store.embeddings import embedding_stats
from resynth_index.store.models import (
    CaptionRow,
    EmbeddingRow,
    ImageRow,
    QueryRow,
    ReferenceRow,
    ResynthesisRow,
)
from resynth_index.store.vectors import read_index_header


@dataclass(frozen=True)
class StoreCounts:
    """How many rows of each kind the store holds."""

    images: int
    captions: int
    resyntheses: int
    references: int
    embeddings: int  # by the lab's embedder
    other_embeddings: int  # by any other embedder (never compared with the lab's)
    embedding_max_id: int  # the largest id among the lab embedder's embeddings, -1 when none
    queries: int
    pending_work_orders: int  # work orders whose active imported generator still lacks the image


def store_counts(session: Session, fingerprint: str) -> StoreCounts:
    """Count the rows of every table; embeddings split by whether ``fingerprint`` made them."""

    def count(table: type) -> int:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)

    ours, max_id = embedding_stats(session, fingerprint)
    return StoreCounts(
        images=count(ImageRow),
        captions=count(CaptionRow),
        resyntheses=count(ResynthesisRow),
        references=count(ReferenceRow),
        embeddings=ours,
        other_embeddings=count(EmbeddingRow) - ours,
        embedding_max_id=max_id,
        queries=count(QueryRow),
        pending_work_orders=len(repository.unfulfilled_work(session)),
    )


@dataclass(frozen=True)
class DiskUsage:
    """The files under a folder and their bytes (symbolic links counted, not followed)."""

    files: int
    bytes: int


def disk_usage(folder: Path) -> DiskUsage:
    """Sum the sizes of every file under ``folder`` (0 files when it does not exist)."""
    files = total = 0
    for directory, _subdirs, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:  # removed meanwhile, or unreadable: not counted
                continue
            files += 1
    return DiskUsage(files=files, bytes=total)


@dataclass(frozen=True)
class IndexFileState:
    """What the index file's header says (all None when the file is missing or unreadable)."""

    exists: bool
    bytes: int
    fingerprint: str | None = None
    dim: int | None = None
    vectors: int | None = None
    watermark: int | None = None
    problem: str | None = None  # why the header cannot be read


def index_file_state(path: Path) -> IndexFileState:
    """Read only the header of the index file at ``path``."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return IndexFileState(exists=False, bytes=0, problem="index file missing")
    except OSError as error:
        return IndexFileState(exists=True, bytes=0, problem=f"index file unreadable: {error}")
    try:
        header = read_index_header(path)
    except StoreError as error:
        return IndexFileState(exists=True, bytes=size, problem=str(error))
    return IndexFileState(
        exists=True,
        bytes=size,
        fingerprint=header["fingerprint"],
        dim=header["dim"],
        vectors=header["count"],
        watermark=header["watermark"],
    )
