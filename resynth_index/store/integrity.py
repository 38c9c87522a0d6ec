"""``rsx check``: does the store agree with its blobs and its vector index? ``--repair`` mends it.

The database is the source of truth. What is derived from it (the vector index, embeddings of
stored images) or is mere debris (orphan blobs, temp files left by a crash) can be repaired; a
blob that is missing or whose bytes no longer match their hash cannot, and is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from resynth_index.store import repository
from resynth_index.store.models import EmbeddingRow, ImageRow

if TYPE_CHECKING:
    from resynth_index.lab import Lab


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepairable: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems or (not self.unrepairable and bool(self.repaired))


def check_lab(lab: Lab, repair: bool = False) -> CheckReport:
    report = CheckReport()
    _check_blobs(lab, report, repair)
    _check_embeddings(lab, report, repair)
    _check_index(lab, report, repair)
    return report


def _check_blobs(lab: Lab, report: CheckReport, repair: bool) -> None:
    with lab.session() as session:
        known = dict(session.execute(select(ImageRow.sha256, ImageRow.blob_path)).all())
    for sha256, blob_path in sorted(known.items()):
        problem = lab.blobs.verify(sha256)
        if blob_path != lab.blobs.relpath_for(sha256):
            problem = (
                problem or f"recorded at {blob_path}, expected {lab.blobs.relpath_for(sha256)}"
            )
        if problem:
            line = f"blob {sha256}: {problem}"
            report.problems.append(line)
            report.unrepairable.append(f"{line} (restore it from the original file and re-ingest)")
    orphans = [sha for sha in lab.blobs.iter_shas() if sha not in known]
    for sha256 in orphans:
        report.problems.append(f"blob {sha256}: not referenced by the database (orphan)")
        if repair:
            lab.blobs.path_for(sha256).unlink(missing_ok=True)
            report.repaired.append(f"removed orphan blob {sha256}")
    if repair:
        removed = lab.blobs.remove_temp_files()
        if removed:
            report.repaired.append(f"removed {removed} temporary file(s) left by an interruption")


def _check_embeddings(lab: Lab, report: CheckReport, repair: bool) -> None:
    fingerprint = lab.fingerprint
    with lab.session() as session:
        wrong_dim = session.scalar(
            select(func.count(EmbeddingRow.id)).where(
                EmbeddingRow.embedder_fingerprint == fingerprint,
                EmbeddingRow.dim != lab.settings.embedder_dim,
            )
        )
        embedded = select(EmbeddingRow.image_id).where(
            EmbeddingRow.embedder_fingerprint == fingerprint
        )
        missing = list(session.scalars(select(ImageRow.id).where(ImageRow.id.not_in(embedded))))
    if wrong_dim:
        line = f"{wrong_dim} embedding(s) have the wrong dimension for this lab's embedder"
        report.problems.append(line)
        report.unrepairable.append(line)
    if missing:
        report.problems.append(f"{len(missing)} image(s) have no embedding from the lab's embedder")
        if repair:
            from resynth_index.errors import RsxError
            from resynth_index.pipeline.intake import ensure_embeddings

            done = 0
            for image_id in missing:
                try:
                    ensure_embeddings(lab, {image_id: None})
                    done += 1
                except RsxError as error:
                    report.unrepairable.append(f"image {image_id}: {error}")
            if done:
                report.repaired.append(f"embedded {done} image(s)")


def _check_index(lab: Lab, report: CheckReport, repair: bool) -> None:
    from resynth_index.store.vectors import VectorIndex

    with lab.session() as session:
        count, max_id = repository.embedding_stats(session, lab.fingerprint)
    if count == 0 and not lab.index_path.exists():
        return
    index = VectorIndex(lab.index_path, lab.fingerprint, lab.settings.embedder_dim)
    health = index.check(count, max_id, lambda: _embedding_ids(lab))
    for problem in health.problems:
        report.problems.append(f"index {lab.index_path.name}: {problem}")
    if health.problems and repair:
        VectorIndex.rebuild(
            lab.index_path, lab.fingerprint, lab.settings.embedder_dim, lab.embedding_source
        )
        report.repaired.append(f"rebuilt index {lab.index_path.name} from {count} embedding(s)")


def _embedding_ids(lab: Lab):
    """Every embedding id of the lab's embedder (8 bytes each), to compare with the index's."""
    import numpy as np

    with lab.session() as session:
        ids = session.scalars(
            select(EmbeddingRow.id).where(EmbeddingRow.embedder_fingerprint == lab.fingerprint)
        )
        return np.fromiter(ids, dtype=np.int64)
