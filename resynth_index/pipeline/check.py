"""``rsx check``: does the store agree with its blobs and its vector index? ``--repair`` mends it.

The database is the source of truth. What is derived from it (the vector index, embeddings of
stored images) or is mere debris (orphan blobs, temp files left by a crash) can be repaired; a
blob that is missing or whose bytes no longer match their hash cannot, and is named with what its
image is to the lab (a query, a reference of G, a resynthesis by G of caption C seed S) and the
path it was first seen under, so that a person knows which file to restore. Files in the
blob store that it never writes (stray files) are named too, and never removed: rsx does not
know what they are. An index that lacks only embeddings stored since its last sync is no problem
(queries store embeddings and never write the index): it is noted, and ``--repair`` syncs it.

A writer stores a blob before the row that points at it, so while an ingest, a query or a
resynthesis is at work its fresh blobs look like debris. They are judged only under the blob
store's exclusive lock (``BlobStore.cleaning``), which no writer holds: while one is at work
they are left alone and counted in a note, never reported as problems nor removed. A blob folder
outside the lab (``rsx init --blobs``) may hold other labs' blobs: unreferenced ones are only
counted in a note there, never removed.

Each problem is a ``Finding`` of a kind (``KINDS``), so that a report of thousands of orphan
blobs can be summed up per kind ("33 problems: 32 orphan blobs, index file missing").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from resynth_index.errors import RsxError
from resynth_index.pipeline.intake import ensure_embeddings
from resynth_index.store import embeddings, repository
from resynth_index.store.integrity import (
    _REINGEST,
    BLOB_PROBLEMS,
    CORRUPT,
    INDEX_AHEAD,
    INDEX_FOREIGN,
    INDEX_MISSING,
    INDEX_OUT_OF_STEP,
    INDEX_UNREADABLE,
    KINDS,
    NOT_EMBEDDED,
    ORPHAN,
    ORPHANS_HELD,
    QUARANTINED,
    STRAY,
    CheckReport,
)

if TYPE_CHECKING:
    import numpy as np

    from resynth_index.lab import Lab
    from resynth_index.store.vectors import IndexHealth


def check(
    lab: Lab, repair: bool = False, *, force: bool = False, purge_quarantine: bool = False
) -> CheckReport:
    """``rsx check``: ``check_lab`` with the lab's embedder to embed the images that lack an
    embedding (``repair``)."""

    def embed(image_id: int) -> None:
        ensure_embeddings(lab, {image_id: None})

    return check_lab(lab, repair, embed, force=force, purge_quarantine=purge_quarantine)


def check_lab(
    lab: Lab,
    repair: bool = False,
    embed: Callable[[int], None] | None = None,
    *,
    force: bool = False,
    purge_quarantine: bool = False,
) -> CheckReport:
    """Compare the database with the blobs and the index; with ``repair`` mend what is derived.

    ``embed(image_id)`` stores the lab embedder's embedding of one stored image (the pipeline's
    job, handed in by the caller); without it, images lacking one are reported, not embedded.
    A repair never deletes a blob: orphans go to the lab's quarantine, and, unless ``force``,
    not at all while the database holds no image, while the index holds vectors the database
    lacks, or when more than ``QUARANTINE_SHARE`` of the blobs would go; ``purge_quarantine``
    (with ``repair``) deletes what earlier repairs quarantined.
    """
    report = CheckReport()
    if not _check_database(lab, report):
        return report  # a corrupt database: nothing else can be judged against it
    health = _index_health(lab)
    _check_blobs(lab, report, repair)
    with lab.blobs.cleaning() as no_writer:  # writers finish their embeddings under their lock
        _check_orphans(lab, report, repair and no_writer, no_writer, health, force)
        _check_embeddings(lab, report, repair, embed, no_writer)
    _check_quarantine(lab, report, repair and purge_quarantine)
    _check_stray_files(lab, report)
    _check_index(lab, report, repair, health, force)
    return report


#: ``rsx check --repair`` moves orphan blobs to quarantine without ``--force`` only while they
#: are at most this share of the blob store: more looks like a database that lost rows (an
#: old backup restored over a newer one), not like the debris of an interrupted write.
QUARANTINE_SHARE = 0.10


def _check_database(lab: Lab, report: CheckReport) -> bool:
    """Whether the database reads as sound (SQLite's quick check); a damaged one is a problem
    no repair of rsx mends, named with how to restore it."""
    with lab.session() as session:
        damage = repository.database_damage(session)
    if damage is None:
        return True
    line = f"the database is corrupt ({damage})"
    report.problem(CORRUPT, line)
    report.cannot_repair(CORRUPT, line)
    return False


def _index_health(lab: Lab) -> IndexHealth | None:
    """The index file compared with every stored embedding id (None: no index and nothing to
    index); read once, before anything is repaired, so that the index's own record of what the
    database held can hold a repair back (see ``_check_orphans``)."""
    from resynth_index.store.vectors import VectorIndex

    with lab.session() as session:
        count, max_id = embeddings.embedding_stats(session, lab.fingerprint)
    if count == 0 and not lab.index_path.exists():
        return None
    index = VectorIndex(lab.index_path, lab.fingerprint, lab.settings.embedder_dim)

    def stored_ids() -> np.ndarray:
        with lab.session() as session:
            return embeddings.all_embedding_ids(session, lab.fingerprint)

    return index.check(count, max_id, stored_ids)


def _check_blobs(lab: Lab, report: CheckReport, repair: bool) -> None:
    """Every image row's blob: present where recorded, its bytes matching its name. A missing
    one that an earlier repair quarantined is moved back (by ``repair``)."""
    with lab.session() as session:
        known = repository.image_blob_paths(session)
    quarantine = lab.quarantine
    returned = 0
    damaged: list[tuple[str, str, str]] = []  # (sha256, kind, problem)
    for sha256, blob_path in sorted(known.items()):
        found = lab.blobs.verify(sha256)
        expected = lab.blobs.relpath_for(sha256)
        if found == "missing" and quarantine.path_for(sha256).is_file():
            report.problem(QUARANTINED, f"blob {sha256}: in quarantine, yet the database names it")
            if repair and quarantine.give_back(lab.blobs, sha256):
                returned += 1
                continue
            if not repair:
                continue
        if found:
            kind, problem = BLOB_PROBLEMS.get(found, ("unreadable blob", found))
        elif blob_path != expected:
            kind, problem = "misrecorded blob", f"recorded at {blob_path}, expected {expected}"
        else:
            continue
        damaged.append((sha256, kind, problem))
    uses: dict[str, list[repository.ImageUse]] = {}
    if damaged:  # what each damaged blob's image is, so a person knows what to restore
        with lab.session() as session:
            uses = repository.image_uses(session, [sha for sha, _kind, _problem in damaged])
    for sha256, kind, problem in damaged:
        line = f"blob {sha256}: {problem}{_used_as(uses.get(sha256, []))}"
        report.problem(kind, line)
        report.cannot_repair(kind, f"{line} ({_REINGEST})")
    if returned:
        report.repaired.append(f"moved {returned} blob(s) back from quarantine")


#: How many characters of a caption a damaged blob's line quotes.
CAPTION_CHARS = 40


def _used_as(uses: Sequence[repository.ImageUse]) -> str:
    """What a damaged blob's image is to the lab, for its line: ``"; the image of: query;
    reference of sd15; resynthesis by sdxl of 'a cat' seed 0; first seen as /cases/x.png"``
    (a blob is named by hash alone, which says nothing to the person who must restore it)."""
    roles = []
    for use in uses:
        if use.role == "reference":
            roles.append(f"reference of {use.generator}")
        elif use.role == "resynthesis":
            roles.append(
                f"resynthesis by {use.generator} of {_quoted(use.caption or '')} seed {use.seed}"
            )
        elif use.role == "query":
            roles.append("query")
    path = next((use.path for use in uses if use.path), None)
    parts = [f"the image of: {'; '.join(roles)}"] if roles else []
    if path:
        parts.append(f"first seen as {path}")
    return "".join(f"; {part}" for part in parts)


def _quoted(caption: str) -> str:
    """A caption in one short line, quoted ("..." marks a cut)."""
    flat = " ".join(caption.split())
    if len(flat) > CAPTION_CHARS:
        flat = flat[: CAPTION_CHARS - 3] + "..."
    return repr(flat)


def _check_orphans(
    lab: Lab,
    report: CheckReport,
    repair: bool,
    no_writer: bool,
    health: IndexHealth | None,
    force: bool,
) -> None:
    """Blobs and temporary files no row points at: debris of an interrupted write, judged only
    while no writer is at work, and moved to quarantine (never deleted) by ``repair`` unless
    the evidence says the database, not the blob store, is what lost something."""
    with lab.session() as session:  # under the lock: rows committed meanwhile count
        known = repository.image_blob_paths(session)
    orphans = [sha for sha in lab.blobs.iter_shas() if sha not in known]
    temp_files = lab.blobs.temp_files()
    if not no_writer:
        unfinished = len(orphans) + len(temp_files)
        if unfinished:
            report.notes.append(
                f"{unfinished} blob(s) or temporary file(s) not yet referenced left alone:"
                " a writer is storing images (check again once it has finished)"
            )
        return
    if orphans and _shared_blob_folder(lab):
        report.notes.append(
            f"{len(orphans)} blob(s) not referenced by this lab's database left alone: the"
            f" blob folder {lab.blobs.root} lies outside the lab and may serve other labs"
        )
        orphans = []
    for sha256 in orphans:
        report.problem(ORPHAN, f"blob {sha256}: not referenced by the database (orphan)")
    held_back = orphans and _orphans_held_back(lab, len(orphans), len(known), health, force)
    if held_back:
        report.problem(ORPHANS_HELD, held_back)
        report.hold_back(ORPHAN)
        if repair:
            report.cannot_repair(ORPHANS_HELD, held_back)
    elif repair and orphans:
        for sha256 in orphans:
            lab.quarantine.take(lab.blobs, sha256)
        report.repaired.append(
            f"moved {_count(len(orphans), ORPHAN)} to quarantine ({lab.quarantine.root})"
        )
    if repair:
        removed = lab.blobs.remove_temp_files()  # no writer: none is being written
        if removed:
            report.repaired.append(f"removed {removed} temporary file(s) left by an interruption")
    elif temp_files:  # debris of a crash, harmless: said, not a problem
        report.notes.append(
            f"{len(temp_files)} temporary file(s) left in the blob store by an interrupted"
            " write ('rsx check --repair' removes them)"
        )


def _orphans_held_back(
    lab: Lab, orphans: int, images: int, health: IndexHealth | None, force: bool
) -> str | None:
    """Why a repair must leave ``orphans`` orphan blobs where they are, or None when it may
    quarantine them. Orphans are debris only while the database is whole: with no image at all,
    or an index that remembers vectors the database lacks, the database is what lost rows (a
    wrong or old copy in place), and the blobs are its evidence."""
    if force:
        return None
    where = f"restore the lab's database ({_database_of(lab)}) from its newest backup"
    if images == 0:
        return (
            f"{orphans} orphan blob(s) left in place: the database holds no image at all; rerun"
            f" the first ingest or query if it was interrupted (it stores their rows), else"
            f" {where}; --repair --force quarantines them"
        )
    if health is not None and health.ahead:
        return (
            f"{orphans} orphan blob(s) left in place: the index holds {health.ahead} vector(s)"
            f" the database does not, so the database looks older than the lab; {where}, or"
            " quarantine them anyway with --repair --force"
        )
    total = orphans + images
    if orphans > QUARANTINE_SHARE * total:
        return (
            f"{orphans} orphan blob(s) left in place: {orphans} of {total} blobs"
            f" ({100 * orphans / total:.0f} %) is more than the {100 * QUARANTINE_SHARE:.0f} % a"
            f" repair moves on its own; rerun the interrupted ingest or query (it stores their"
            f" rows), {where}, or quarantine them with --repair --force"
        )
    return None


def _database_of(lab: Lab) -> str:
    from resynth_index.store.engine import database_name

    return database_name(lab.engine)


def _check_quarantine(lab: Lab, report: CheckReport, purge: bool) -> None:
    """What earlier repairs quarantined: counted in a note, deleted only when asked."""
    held = lab.quarantine.shas()
    if not held:
        return
    if purge:
        removed = lab.quarantine.purge()
        report.repaired.append(f"deleted {removed} quarantined blob(s) from {lab.quarantine.root}")
        return
    report.notes.append(
        f"{len(held)} blob(s) in quarantine ({lab.quarantine.root}), moved there by an earlier"
        " repair: 'rsx check --repair --purge-quarantine' deletes them"
    )


def _shared_blob_folder(lab: Lab) -> bool:
    """Whether the lab's blobs live outside it (``rsx init --blobs``): another lab, with its own
    database, may keep blobs there that this lab's database does not know."""
    try:
        return lab.blobs.root.resolve() != (lab.root / "blobs").resolve()
    except OSError:
        return True


def _check_stray_files(lab: Lab, report: CheckReport) -> None:
    """Files the blob store never writes: named and left where they are, whatever ``repair``."""
    root = lab.blobs.root
    for path in lab.blobs.stray_files():
        shown = path.relative_to(root.parent)
        name = path.name
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
            why = f"named as a blob but filed elsewhere (its place: {lab.blobs.relpath_for(name)})"
        else:
            why = "not a blob nor a temporary file of the blob store"
        line = f"stray file {shown}: {why}"
        report.problem(STRAY, line)
        report.cannot_repair(STRAY, f"stray file {shown}: rsx leaves what it did not write alone")


def _check_embeddings(
    lab: Lab,
    report: CheckReport,
    repair: bool,
    embed: Callable[[int], None] | None,
    no_writer: bool,
) -> None:
    """Every image embedded by the lab's embedder, at its dimension. Run under the blob store's
    lock: a writer holds its own until its images are embedded, so while one is at work images
    without an embedding are its work in progress (a note), not damage."""
    with lab.session() as session:
        wrong_dim = embeddings.wrong_dimension_count(
            session, lab.fingerprint, lab.settings.embedder_dim
        )
        missing = embeddings.images_without_embedding(session, lab.fingerprint)
    if wrong_dim:
        line = f"{wrong_dim} embedding(s) have the wrong dimension for this lab's embedder"
        report.problem("wrong-dimension embedding", line, wrong_dim)
        report.cannot_repair("wrong-dimension embedding", line, wrong_dim)
    if not missing:
        return
    if not no_writer:
        report.notes.append(
            f"{len(missing)} image(s) without an embedding left alone: a writer is storing"
            " and embedding images (check again once it has finished)"
        )
        return
    report.problem(
        NOT_EMBEDDED,
        f"{len(missing)} image(s) have no embedding from the lab's embedder",
        len(missing),
    )
    if not repair:
        return
    if embed is None:
        report.cannot_repair("no embedder", "no embedder was given to embed them")
        return
    done = 0
    for image_id in missing:
        try:
            embed(image_id)
            done += 1
        except RsxError as error:
            report.cannot_repair("image that cannot be embedded", f"image {image_id}: {error}")
    if done:
        report.repaired.append(f"embedded {done} image(s)")


def _check_index(
    lab: Lab, report: CheckReport, repair: bool, health: IndexHealth | None, force: bool
) -> None:
    from resynth_index.store.vectors import VectorIndex

    if health is None:
        return
    with lab.session() as session:
        count = embeddings.embedding_stats(session, lab.fingerprint)[0]
    if health.behind:  # a lag, not damage: queries store embeddings and leave them to a sync
        report.notes.append(
            f"index {lab.index_path.name}: {health.behind} embedding(s) stored since its last"
            " sync are not in it yet (queries read them from the database); 'rsx index sync'"
            " adds them"
        )
        if repair:
            synced = lab.sync_index()
            report.repaired.append(
                f"synced index {lab.index_path.name}: {synced.count} vector(s) ({synced.added:+d})"
            )
        return
    for problem in health.problems:
        report.problem(_index_kind(problem), f"index {lab.index_path.name}: {problem}")
    if health.ahead and not force:
        line = (
            f"index {lab.index_path.name} kept: it holds {health.ahead} vector(s) the database"
            f" does not, the record that the database once held more; restore the lab's"
            f" database ({_database_of(lab)}) from its newest backup, or rebuild the index from"
            " this database with --repair --force"
        )
        report.problem(INDEX_AHEAD, line)
        report.hold_back(INDEX_OUT_OF_STEP)
        if repair:
            report.cannot_repair(INDEX_AHEAD, line)
        return
    if health.problems and repair:
        VectorIndex.rebuild(
            lab.index_path, lab.fingerprint, lab.settings.embedder_dim, lab.embedding_source
        )
        report.repaired.append(f"rebuilt index {lab.index_path.name} from {count} embedding(s)")


def _index_kind(problem: str) -> str:
    """The kind of one of ``VectorIndex.check``'s lines."""
    if problem == "index file missing":
        return INDEX_MISSING
    if problem.startswith("index file unreadable"):
        return INDEX_UNREADABLE
    if problem.startswith("index was built by embedder") or "-dimensional vectors" in problem:
        return INDEX_FOREIGN
    return INDEX_OUT_OF_STEP


def _count(n: int, singular: str) -> str:
    return f"{n} {singular if n == 1 else KINDS[singular].plural}"
