"""``rsx check``: does the store agree with its blobs and its vector index? ``--repair`` mends it.

The database is the source of truth. What is derived from it (the vector index, embeddings of
stored images) or is mere debris (orphan blobs, temp files left by a crash) can be repaired; a
blob that is missing or whose bytes no longer match their hash cannot, and is named.

A writer stores a blob before the row that points at it, so while an ingest, a query or a
resynthesis is at work its fresh blobs look like debris. They are judged only under the blob
store's exclusive lock (``BlobStore.cleaning``), which no writer holds: while one is at work
they are left alone and counted in a note, never reported as problems nor removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from resynth_index.errors import RsxError
from resynth_index.store import embeddings, repository

if TYPE_CHECKING:
    import numpy as np

    from resynth_index.lab import Lab

#: What ``rsx check`` says about a blob, by what ``BlobStore.verify`` found.
BLOB_PROBLEMS = {
    "missing": "missing from the blob store",
    "hash mismatch": "altered: its bytes no longer match their SHA-256",
    "unreadable": "unreadable (permissions or a disk error)",
}


@dataclass
class CheckReport:
    """Problems found (one line each), what was repaired, what cannot be, and plain notes."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepairable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not problems: e.g. what a writer is storing

    @property
    def ok(self) -> bool:
        """No problem left: none found, or all repaired."""
        return not self.problems or (not self.unrepairable and bool(self.repaired))


def check_lab(
    lab: Lab, repair: bool = False, embed: Callable[[int], None] | None = None
) -> CheckReport:
    """Compare the database with the blobs and the index; with ``repair`` mend what is derived.

    ``embed(image_id)`` stores the lab embedder's embedding of one stored image (the pipeline's
    job, handed in by the caller); without it, images lacking one are reported, not embedded.
    """
    report = CheckReport()
    _check_blobs(lab, report, repair)
    _check_embeddings(lab, report, repair, embed)
    _check_index(lab, report, repair)
    return report


def _check_blobs(lab: Lab, report: CheckReport, repair: bool) -> None:
    with lab.session() as session:
        known = repository.image_blob_paths(session)
    for sha256, blob_path in sorted(known.items()):
        found = lab.blobs.verify(sha256)
        problem = BLOB_PROBLEMS.get(found, found) if found else None
        if problem is None and blob_path != lab.blobs.relpath_for(sha256):
            problem = f"recorded at {blob_path}, expected {lab.blobs.relpath_for(sha256)}"
        if problem:
            line = f"blob {sha256}: {problem}"
            report.problems.append(line)
            report.unrepairable.append(f"{line} (restore it from the original file and re-ingest)")
    with lab.blobs.cleaning() as no_writer:
        with lab.session() as session:  # again, under the lock: rows committed meanwhile count
            known = repository.image_blob_paths(session)
        orphans = [sha for sha in lab.blobs.iter_shas() if sha not in known]
        if not no_writer:
            unfinished = len(orphans) + len(lab.blobs.temp_files())
            if unfinished:
                report.notes.append(
                    f"{unfinished} blob(s) or temporary file(s) not yet referenced left alone:"
                    " a writer is storing images (check again once it has finished)"
                )
            return
        for sha256 in orphans:
            report.problems.append(f"blob {sha256}: not referenced by the database (orphan)")
            if repair:
                lab.blobs.path_for(sha256).unlink(missing_ok=True)
                report.repaired.append(f"removed orphan blob {sha256}")
        if repair:
            removed = lab.blobs.remove_temp_files()
            if removed:
                report.repaired.append(
                    f"removed {removed} temporary file(s) left by an interruption"
                )


def _check_embeddings(
    lab: Lab, report: CheckReport, repair: bool, embed: Callable[[int], None] | None
) -> None:
    with lab.session() as session:
        wrong_dim = embeddings.wrong_dimension_count(
            session, lab.fingerprint, lab.settings.embedder_dim
        )
        missing = embeddings.images_without_embedding(session, lab.fingerprint)
    if wrong_dim:
        line = f"{wrong_dim} embedding(s) have the wrong dimension for this lab's embedder"
        report.problems.append(line)
        report.unrepairable.append(line)
    if not missing:
        return
    report.problems.append(f"{len(missing)} image(s) have no embedding from the lab's embedder")
    if not repair:
        return
    if embed is None:
        report.unrepairable.append("no embedder was given to embed them")
        return
    done = 0
    for image_id in missing:
        try:
            embed(image_id)
            done += 1
        except RsxError as error:
            report.unrepairable.append(f"image {image_id}: {error}")
    if done:
        report.repaired.append(f"embedded {done} image(s)")


def _check_index(lab: Lab, report: CheckReport, repair: bool) -> None:
    from resynth_index.store.vectors import VectorIndex

    with lab.session() as session:
        count, max_id = embeddings.embedding_stats(session, lab.fingerprint)
    if count == 0 and not lab.index_path.exists():
        return
    index = VectorIndex(lab.index_path, lab.fingerprint, lab.settings.embedder_dim)

    def stored_ids() -> np.ndarray:
        with lab.session() as session:
            return embeddings.all_embedding_ids(session, lab.fingerprint)

    health = index.check(count, max_id, stored_ids)
    for problem in health.problems:
        report.problems.append(f"index {lab.index_path.name}: {problem}")
    if health.problems and repair:
        VectorIndex.rebuild(
            lab.index_path, lab.fingerprint, lab.settings.embedder_dim, lab.embedding_source
        )
        report.repaired.append(f"rebuilt index {lab.index_path.name} from {count} embedding(s)")
