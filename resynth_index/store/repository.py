"""The lab's questions to its database, one function each: the only place outside store/ asks.

Every function takes the caller's ``Session`` (one unit of work, see ``Lab.session``) and is
named for what it asks or records. Inserts are ON CONFLICT DO NOTHING followed by a lookup, so two
processes storing the same thing at once both end with the one row, and a re-run after a crash is
a no-op for what landed. The embeddings table has its own module (``store/embeddings.py``),
the audit of queries too (``store/audit.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import CursorResult, Engine, bindparam, exists, func, select, text, update
from sqlalchemy.orm import Session

from resynth_index.errors import StoreError
from resynth_index.store.engine import (
    dialect_insert,
    in_chunks,
    insert_ignore,
    insert_ignore_many,
    table_of,
)
from resynth_index.store.models import (
    CaptionRow,
    GeneratorRow,
    ImageRow,
    PendingResynthesisRow,
    ReferenceRow,
    ResynthesisRow,
    utcnow,
)


# ------------------------------------------------------------------------------ generators
def generator_by_name(session: Session, name: str) -> GeneratorRow | None:
    """The generator registered under ``name`` (retired or not), or None."""
    return session.scalar(select(GeneratorRow).where(GeneratorRow.name == name))


# built once (every query asks): see ``store/embeddings.py`` for what that saves
_ALL_GENERATORS = select(GeneratorRow).order_by(GeneratorRow.name)
_ACTIVE_GENERATORS = _ALL_GENERATORS.where(GeneratorRow.retired_at.is_(None))


def list_generators(session: Session, *, include_retired: bool = False) -> list[GeneratorRow]:
    """The registered generators by name; the retired ones only when asked."""
    return list(session.scalars(_ALL_GENERATORS if include_retired else _ACTIVE_GENERATORS))


def add_generator(
    session: Session,
    *,
    name: str,
    kind: str,
    source: str | None,
    settings_json: str,
    fingerprint: str,
) -> GeneratorRow:
    """Register a generator; a name already taken fails with the database's IntegrityError."""
    row = GeneratorRow(
        name=name,
        kind=kind,
        source=source,
        settings_json=settings_json,
        fingerprint=fingerprint,
        added_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def retire_generator(session: Session, row: GeneratorRow) -> None:
    """Mark a generator retired now: it stays in the lab, but is no longer a candidate."""
    row.retired_at = utcnow()
    session.add(row)


def restore_generator(session: Session, row: GeneratorRow) -> None:
    """Bring a retired generator back: a candidate again, with everything it made."""
    row.retired_at = None
    session.add(row)


def update_generator_settings(
    session: Session,
    generator_id: int,
    *,
    expected_settings_json: str,
    expected_fingerprint: str,
    settings_json: str,
    fingerprint: str,
) -> bool:
    """Replace a generator's settings record and fingerprint, only if both are still the ones
    the caller read (compare and set); False when another writer changed them meanwhile."""
    result = session.execute(  # an UPDATE: its result is a CursorResult with a rowcount
        update(GeneratorRow)
        .where(
            GeneratorRow.id == generator_id,
            GeneratorRow.settings_json == expected_settings_json,
            GeneratorRow.fingerprint == expected_fingerprint,
        )
        .values(settings_json=settings_json, fingerprint=fingerprint)
        .execution_options(synchronize_session="fetch")
    )
    return bool(cast("CursorResult[Any]", result).rowcount)


# ------------------------------------------------------------------------------ images, captions
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
    """Record an image whose blob is stored; (image id, True if this call added it)."""
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
    assert image_id is not None  # inserted or already there, in this transaction
    return image_id, bool(result.rowcount)


class ImageRecord(NamedTuple):
    """An image whose blob is stored, as ``ensure_images`` records it."""

    sha256: str
    blob_path: str
    size_bytes: int
    fmt: str
    width: int
    height: int


def ensure_images(session: Session, images: Sequence[ImageRecord]) -> list[tuple[int, bool]]:
    """Record a batch of images whose blobs are stored: (image id, True if this call added it)
    per image, in order, as ``ensure_image`` called for each in turn would say (an image listed
    twice is added by its first listing only).

    Two statements for the whole batch: one INSERT ... ON CONFLICT DO NOTHING RETURNING run for
    every new row (executemany, batched by the driver), then one SELECT of the ids. Both are
    built once per dialect and compiled once. Rows go in sorted by content hash, so concurrent
    writers of overlapping batches take their locks in one order (no deadlock on PostgreSQL);
    one that finds a row a concurrent writer inserted waits for it, then does nothing, and
    reads its id, as ``ensure_image`` does.
    """
    first: dict[str, ImageRecord] = {}
    for image in images:
        first.setdefault(image.sha256, image)
    if not first:
        return []
    now = utcnow()
    rows = [
        {
            "sha256": image.sha256,
            "blob_path": image.blob_path,
            "size_bytes": image.size_bytes,
            "format": image.fmt,
            "width": image.width,
            "height": image.height,
            "created_at": now,
        }
        for _sha, image in sorted(first.items())
    ]
    insert, lookup = _image_statements(session.get_bind().dialect.name)
    added = set(session.scalars(insert, rows))
    ids: dict[str, int] = {}
    for chunk in in_chunks(first):
        ids.update({sha: image_id for sha, image_id in session.execute(lookup, {"shas": chunk})})
    result = []
    for image in images:
        new = image.sha256 in added
        added.discard(image.sha256)  # a second listing of the image is not new
        result.append((ids[image.sha256], new))
    return result


_IMAGE_STATEMENTS: dict[str, tuple[Any, Any]] = {}


def _image_statements(dialect: str) -> tuple[Any, Any]:
    """``ensure_images``' INSERT (returning the hashes it added) and SELECT, per dialect."""
    statements = _IMAGE_STATEMENTS.get(dialect)
    if statements is None:
        images = table_of(ImageRow)  # the table, not the ORM class: no ORM bulk path
        statements = _IMAGE_STATEMENTS[dialect] = (
            dialect_insert(dialect, images)
            .on_conflict_do_nothing(index_elements=["sha256"])
            .returning(images.c.sha256),
            select(ImageRow.sha256, ImageRow.id).where(
                ImageRow.sha256.in_(bindparam("shas", expanding=True))
            ),
        )
    return statements


def image_sha256(session: Session, image_id: int) -> str | None:
    """The content hash of a stored image, or None when no such image exists."""
    return session.scalar(select(ImageRow.sha256).where(ImageRow.id == image_id))


def image_sha256s(session: Session, image_ids: Sequence[int]) -> dict[int, str]:
    """image id -> content hash, for those of ``image_ids`` that exist."""
    found: dict[int, str] = {}
    for ids in in_chunks(image_ids):
        rows = session.execute(select(ImageRow.id, ImageRow.sha256).where(ImageRow.id.in_(ids)))
        found.update({image_id: sha for image_id, sha in rows})
    return found


def image_blob_paths(session: Session) -> dict[str, str]:
    """Every stored image: content hash -> blob path as recorded (what ``rsx check`` verifies)."""
    return {sha: path for sha, path in session.execute(select(ImageRow.sha256, ImageRow.blob_path))}


def ensure_caption(session: Session, caption_hash: str, text: str) -> None:
    """Record a caption under the hash of its normalised text (a no-op when known)."""
    insert_ignore_many(
        session,
        CaptionRow,
        [{"hash": caption_hash, "text": text, "created_at": utcnow()}],
        ["hash"],
    )


def caption_texts(session: Session, caption_hashes: Sequence[str]) -> dict[str, str]:
    """caption hash -> text, for those of ``caption_hashes`` that are recorded."""
    found: dict[str, str] = {}
    for hashes in in_chunks(caption_hashes):
        rows = session.execute(
            select(CaptionRow.hash, CaptionRow.text).where(CaptionRow.hash.in_(hashes))
        )
        found.update({digest: text for digest, text in rows})
    return found


# ------------------------------------------------------------------------------ resyntheses
class StoredResynthesis(NamedTuple):
    """One stored resynthesis as a plan needs it (plain values, no ORM object)."""

    caption_hash: str
    generator_id: int
    seed: int
    settings_hash: str
    image_id: int
    sha256: str


def stored_resyntheses(
    session: Session, caption_hashes: Sequence[str], generator_ids: Sequence[int]
) -> list[StoredResynthesis]:
    """Every stored resynthesis of these captions by these generators, oldest first."""
    if not caption_hashes or not generator_ids:
        return []
    rows = session.execute(
        _STORED_RESYNTHESES,
        {"captions": list(caption_hashes), "generators": list(generator_ids)},
    )
    return [StoredResynthesis(*row) for row in rows]


_STORED_RESYNTHESES = (  # built once: every query plans with it
    select(
        ResynthesisRow.caption_hash,
        ResynthesisRow.generator_id,
        ResynthesisRow.seed,
        ResynthesisRow.settings_hash,
        ResynthesisRow.image_id,
        ImageRow.sha256,
    )
    .join(ImageRow, ImageRow.id == ResynthesisRow.image_id)
    .where(
        ResynthesisRow.caption_hash.in_(bindparam("captions", expanding=True)),
        ResynthesisRow.generator_id.in_(bindparam("generators", expanding=True)),
    )
    .order_by(ResynthesisRow.id)
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
    """Record a resynthesis; True when this call stored it.

    False means the slot (generator, caption, settings, seed) was taken already, by this image
    or by another one: ``resynthesis_in_slot`` says which.
    """
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


def resynthesis_in_slot(
    session: Session, *, generator_id: int, caption_hash: str, settings_hash: str, seed: int
) -> tuple[int, str] | None:
    """(image id, image hash) of the resynthesis stored for that slot, or None when it is free."""
    row = session.execute(
        select(ResynthesisRow.image_id, ImageRow.sha256)
        .join(ImageRow, ImageRow.id == ResynthesisRow.image_id)
        .where(
            ResynthesisRow.generator_id == generator_id,
            ResynthesisRow.caption_hash == caption_hash,
            ResynthesisRow.settings_hash == settings_hash,
            ResynthesisRow.seed == seed,
        )
    ).first()
    return None if row is None else (row[0], row[1])


class SlotClaim(NamedTuple):
    """What ``claim_resynthesis_slot`` found: ``seed`` the slot's seed; ``holder`` the (image id,
    image hash) the slot holds, this image when ``claimed`` (this call's row went in), else the
    image another writer stored there first (perhaps the very same image)."""

    claimed: bool
    seed: int
    holder: tuple[int, str]


#: How often a next free seed may be taken by concurrent writers in a row before a claim gives up.
SEED_TRIES = 8


def claim_resynthesis_slot(
    session: Session,
    *,
    image_id: int,
    sha256: str,
    seed: int | None,
    generator_id: int,
    caption_hash: str,
    settings_hash: str,
) -> SlotClaim:
    """Record ``image_id`` as the resynthesis in the slot (generator, caption, settings, seed),
    or say who holds it: a slot holds one image, whoever comes first, under any concurrency.

    ``seed`` None (an imported generator's delivery, which has none) takes the caption's next
    free seed, and tries the next again when a concurrent writer took it meanwhile (at most
    ``SEED_TRIES`` times, then StoreError). With a seed, the slot's holder is returned as is.
    """
    for _ in range(SEED_TRIES):
        chosen = seed
        if chosen is None:
            chosen = next_free_seed(session, generator_id, caption_hash, settings_hash)
        where = (generator_id, caption_hash, settings_hash, chosen)
        if ensure_resynthesis(session, image_id=image_id, **_slot(*where)):
            return SlotClaim(True, chosen, (image_id, sha256))
        held = resynthesis_in_slot(session, **_slot(*where))
        if held is not None and (seed is not None or held[1] == sha256):
            return SlotClaim(False, chosen, held)
    raise StoreError("no free seed found for a resynthesis: other writers keep taking them")


def _slot(generator_id: int, caption_hash: str, settings_hash: str, seed: int) -> dict[str, Any]:
    """The keyword arguments that name one resynthesis slot."""
    return {
        "generator_id": generator_id,
        "caption_hash": caption_hash,
        "settings_hash": settings_hash,
        "seed": seed,
    }


def resynthesis_seed_of_image(
    session: Session, *, generator_id: int, caption_hash: str, settings_hash: str, sha256: str
) -> int | None:
    """The seed under which this image (by content hash) is a resynthesis of that caption by that
    generator, or None when it is not one."""
    return session.scalar(
        select(ResynthesisRow.seed)
        .join(ImageRow, ImageRow.id == ResynthesisRow.image_id)
        .where(
            ResynthesisRow.generator_id == generator_id,
            ResynthesisRow.caption_hash == caption_hash,
            ResynthesisRow.settings_hash == settings_hash,
            ImageRow.sha256 == sha256,
        )
        .order_by(ResynthesisRow.seed)
        .limit(1)
    )


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


# ------------------------------------------------------------------------------ references
class Reference(NamedTuple):
    """An image whose generator is known, and the caption it was made from (if known)."""

    image_id: int
    generator_id: int
    caption_hash: str | None


def ensure_reference(
    session: Session, *, image_id: int, generator_id: int, caption_hash: str | None
) -> bool:
    """Record that ``image_id`` was made by ``generator_id``; True when this call added it."""
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


def references_of(session: Session, generator_ids: Sequence[int]) -> list[Reference]:
    """The references of these generators, in the order they were recorded."""
    if not generator_ids:
        return []
    rows = session.execute(
        select(ReferenceRow.image_id, ReferenceRow.generator_id, ReferenceRow.caption_hash)
        .where(ReferenceRow.generator_id.in_(list(generator_ids)))
        .order_by(ReferenceRow.id)
    )
    return [Reference(*row) for row in rows]


# ------------------------------------------------------------------------------ work orders
def add_pending(session: Session, generator_id: int, caption_hash: str) -> None:
    """Record that a query needed a resynthesis of this caption the generator cannot make."""
    insert_ignore(
        session,
        PendingResynthesisRow,
        {"generator_id": generator_id, "caption_hash": caption_hash, "created_at": utcnow()},
        ["generator_id", "caption_hash"],
    )


def unfulfilled_work(
    session: Session, generator_name: str | None = None
) -> list[tuple[str, str, str]]:
    """(generator name, caption hash, caption text) of every recorded work order whose active
    generator still has no resynthesis of the caption, oldest first (only the named
    generator's when ``generator_name`` is given)."""
    fulfilled = (
        exists()
        .where(
            ResynthesisRow.generator_id == PendingResynthesisRow.generator_id,
            ResynthesisRow.caption_hash == PendingResynthesisRow.caption_hash,
        )
        .correlate(PendingResynthesisRow)
    )
    statement = (
        select(GeneratorRow.name, CaptionRow.hash, CaptionRow.text)
        .select_from(PendingResynthesisRow)
        .join(GeneratorRow, GeneratorRow.id == PendingResynthesisRow.generator_id)
        .join(CaptionRow, CaptionRow.hash == PendingResynthesisRow.caption_hash)
        .where(~fulfilled, GeneratorRow.retired_at.is_(None))
        .order_by(PendingResynthesisRow.id)
    )
    if generator_name is not None:
        statement = statement.where(GeneratorRow.name == generator_name)
    return [(name, digest, text) for name, digest, text in session.execute(statement)]


def database_damage(session: Session) -> str | None:
    """What SQLite's quick check finds wrong with the database file (its first line), or None
    when it is sound; a server database (PostgreSQL) looks after its own pages: None."""
    if session.get_bind().dialect.name != "sqlite":
        return None
    found = [str(row[0]) for row in session.execute(text("PRAGMA quick_check(1)"))]
    return None if found == ["ok"] else (found[0] if found else "no answer")


# ------------------------------------------------------------------------------ what uses a blob
class ImageUse(NamedTuple):
    """One row that uses a stored image: its ``role`` (``query``, ``reference`` or
    ``resynthesis``), the generator (references and resyntheses), the caption text and seed
    (resyntheses), and the path the image was given under (queries: the path asked about)."""

    role: str
    generator: str | None = None
    caption: str | None = None
    seed: int | None = None
    path: str | None = None


def image_uses(session: Session, shas: Sequence[str]) -> dict[str, list[ImageUse]]:
    """sha256 -> the rows that use that image (resyntheses, references, then the first query),
    for those of ``shas`` some row uses: what ``rsx check`` says of a damaged blob, so that a
    person knows which image it was.

    Only the first query of an image is listed (its path is the image's first known name);
    a file the lab remembers reading (``file_digests``) names the image where no query does.
    """
    from resynth_index.store.models import FileDigestRow, QueryRow

    wanted = list(dict.fromkeys(shas))
    uses: dict[str, list[ImageUse]] = {}
    for chunk in in_chunks(wanted):
        resyntheses = session.execute(
            select(ImageRow.sha256, GeneratorRow.name, CaptionRow.text, ResynthesisRow.seed)
            .join(ResynthesisRow, ResynthesisRow.image_id == ImageRow.id)
            .join(GeneratorRow, GeneratorRow.id == ResynthesisRow.generator_id)
            .join(CaptionRow, CaptionRow.hash == ResynthesisRow.caption_hash)
            .where(ImageRow.sha256.in_(chunk))
            .order_by(ResynthesisRow.id)
        )
        for sha, name, caption, seed in resyntheses:
            uses.setdefault(sha, []).append(ImageUse("resynthesis", name, caption, seed))
        references = session.execute(
            select(ImageRow.sha256, GeneratorRow.name)
            .join(ReferenceRow, ReferenceRow.image_id == ImageRow.id)
            .join(GeneratorRow, GeneratorRow.id == ReferenceRow.generator_id)
            .where(ImageRow.sha256.in_(chunk))
            .order_by(ReferenceRow.id)
        )
        for sha, name in references:
            uses.setdefault(sha, []).append(ImageUse("reference", name))
        first_query = (
            select(QueryRow.image_sha256, func.min(QueryRow.id).label("first"))
            .where(QueryRow.image_sha256.in_(chunk))
            .group_by(QueryRow.image_sha256)
            .subquery()
        )
        queries = session.execute(
            select(QueryRow.image_sha256, QueryRow.image_path).join(
                first_query, QueryRow.id == first_query.c.first
            )
        )
        for sha, path in queries:
            uses.setdefault(sha, []).append(ImageUse("query", path=path))
        files: dict[str, list[str]] = {}
        for sha, path in session.execute(
            select(FileDigestRow.sha256, FileDigestRow.path).where(FileDigestRow.sha256.in_(chunk))
        ):
            files.setdefault(sha, []).append(path)
        for sha, paths in files.items():
            # the blob store's own copy (named by its hash) is no name a person knows it by
            named = sorted(path for path in paths if not path.endswith(sha))
            if named and not any(use.path for use in uses.get(sha, [])):
                uses.setdefault(sha, []).append(ImageUse("file", path=named[0]))
    return uses


def query_margins(session: Session, query_ids: Sequence[int]) -> dict[int, float | None]:
    """query id -> the margin its recorded answer gives (second-best minus best distance;
    None with one candidate or in an answer without one), for those of ``query_ids`` recorded."""
    import json

    from resynth_index.store.models import QueryRow

    found: dict[int, float | None] = {}
    for ids in in_chunks(list(query_ids)):
        rows = session.execute(
            select(QueryRow.id, QueryRow.result_json).where(QueryRow.id.in_(ids))
        )
        for query_id, stored in rows:
            try:
                margin = json.loads(stored).get("margin")
            except (ValueError, AttributeError):  # a damaged answer: no margin to show
                margin = None
            found[query_id] = float(margin) if isinstance(margin, int | float) else None
    return found


def database_answers(engine: Engine) -> None:
    """Ask the database the simplest question (``SELECT 1``): raises when it cannot answer."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
