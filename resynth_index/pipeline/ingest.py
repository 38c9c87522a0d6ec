"""Bringing images into a lab: files, folders, manifests and the paper's dataset layout.

Ingest is idempotent by content hash and resumable: each batch is stored (blobs, rows, then
embeddings) before the next begins, and what already landed is skipped on a re-run. A bad file
fails alone with one line naming it. A file read and stored has its digest remembered with its
stat, and so has its blob (``store/digests.py``); a re-run skips the files whose stat still
matches and whose image (blob unchanged too) and role are stored, without opening them
(``pipeline/unchanged.py``), and reads the rest; ``reread`` reads every file.

A resynthesis fills one slot (generator, caption, settings, seed), and a slot holds one image. A
delivery of another image for a slot already filled is refused (it fails, with a line saying so)
and never counted as added. A resynthesis of an imported generator given without a seed takes the
caption's next free seed (0, 1, 2... in the order they arrive), so a service's several images of
one caption all count; a runnable generator's resynthesis must name its seed.

Input is checked before any model loads: paths that name nothing (a missing file, an empty
folder, a shell pattern that matched nothing), manifest lines that cannot be read, a work-order
row whose ``caption_hash`` no longer matches its caption, and roles without the generator (or
seed) they need are failures with one line each, found without decoding an image. An ingest left
with nothing to load never loads the embedder. Interrupted (Ctrl-C), it raises
``IngestInterrupted`` with what the finished batches stored: a re-run continues from there.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from resynth_index.errors import RsxError
from resynth_index.hashing import FileStat
from resynth_index.media.images import (
    LoadedImage,
    load_image_bytes,
    load_image_file,
)
from resynth_index.models.generators import factory
from resynth_index.pipeline.ingest_items import IngestFailure, IngestItem
from resynth_index.pipeline.intake import store_images, write_embeddings
from resynth_index.pipeline.loading import (
    FileJob,
    FileLoad,
    LoadingPool,
    load_file,
    resolve_workers,
    stat_or_none,
    transform_for_workers,
)
from resynth_index.pipeline.unchanged import unchanged_items
from resynth_index.store import embeddings, repository
from resynth_index.store.blobs import StagedBlob
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from resynth_index.lab import Lab
    from resynth_index.models.embedders import Embedder


@dataclass
class IngestSummary:
    added: int = 0
    skipped: int = 0
    failures: list[IngestFailure] = field(default_factory=list)
    generators_added: list[str] = field(default_factory=list)
    unchanged: int = 0  # of ``skipped``: found stored by the file's stat, without reading it

    @property
    def failed(self) -> int:
        """How many items failed (each has one line in ``failures``)."""
        return len(self.failures)


class IngestInterrupted(KeyboardInterrupt):
    """Ctrl-C during an ingest; ``summary`` counts what the batches finished before it stored.

    A KeyboardInterrupt still (callers unaware of it stop as before). Nothing is half-written: a
    batch's rows land in one transaction, and a re-run of the same ingest skips what is stored.
    """

    def __init__(self, summary: IngestSummary) -> None:
        super().__init__(f"ingest interrupted after storing {summary.added} image(s)")
        self.summary = summary


# ------------------------------------------------------------------------- the ingest loop
_QUEUE_DEPTH = 1  # batches decoded ahead of the one being stored and embedded


@dataclass
class _Loaded:
    """One batch as the loader hands it over: decoded, hashed, maybe preprocessed, its blobs
    in place and durable (``BlobStore.place``), its rows not yet written."""

    entries: list[tuple[IngestItem, LoadedImage, Any] | IngestFailure]  # Any: the caption
    pixels: Any = None  # (n, 3, H, W) tensor for the images not yet embedded, or None
    pixel_row: dict[str, int] = field(default_factory=dict)  # sha256 -> row of ``pixels``
    # entry position -> the file's stat before it was read, when unchanged by the read
    stats: dict[int, FileStat] = field(default_factory=dict)
    # entry position -> its blob's stat just after it was placed (or found intact)
    blob_stats: dict[int, FileStat] = field(default_factory=dict)


def ingest(
    lab: Lab,
    items: Iterable[IngestItem | IngestFailure],
    *,
    batch_size: int | None = None,
    register_missing_as_imported: bool = False,
    progress: Callable[[int], None] | None = None,
    on_failure: Callable[[IngestFailure], None] | None = None,
    reread: bool = False,
    workers: int | None = None,
) -> IngestSummary:
    """Store every item, batch by batch; failures are collected, never raised.

    Items stored already whose files are unchanged since are skipped without being opened
    (counted in ``skipped`` and ``unchanged``; see ``pipeline/unchanged.py``); ``reread`` reads
    every file instead (to restore a blob whose bytes rotted without a change of stat).

    Every item is checked first with reads of the store only (``check_items``): an ingest left
    with nothing to load reports its failures without loading the embedder. Then the files are
    read, hashed, decoded, preprocessed and their blobs staged ahead of the batch being stored
    and embedded here: by ``workers`` worker processes (``pipeline/loading.py``; None: as many
    as ``resolve_workers`` chooses for the cores and the number of files), or by a loader thread
    (0, and what auto chooses on a small machine or for a small ingest). A batch's blobs are put
    in place durably in one step (``BlobStore.place``: their flushes side by side, each
    directory once) before it is handed over, so its rows, written here in one transaction,
    never point at a blob a crash could take. The index is synced once at the end. The whole
    ingest holds the blob store's writers' lock: blobs written ahead of their rows are never
    taken for debris by ``rsx check --repair``. Ctrl-C raises ``IngestInterrupted`` with the
    summary so far; a worker process that dies raises ``WorkerDied`` (one line), its batch
    unstored.
    """
    batch_size = batch_size or lab.settings.embedding_batch_size
    if batch_size < 1:
        raise RsxError(f"batch size must be at least 1, not {batch_size}")
    summary = IngestSummary()
    generators: dict[str, GeneratorRow | None] = {}

    def fail(failure: IngestFailure) -> None:
        summary.failures.append(failure)
        if on_failure:
            on_failure(failure)

    try:
        checked = check_items(lab, items, register_missing=register_missing_as_imported)
        if not reread:
            checked = _skip_unchanged(lab, checked, summary, progress)
        if not any(isinstance(item, IngestItem) for item in checked):
            for item in checked:
                if isinstance(item, IngestFailure):  # all of them: nothing is left to load
                    fail(item)
            if progress and checked:
                progress(len(checked))
            if summary.unchanged:
                lab.sync_index()  # as the full path would: a re-run catches the index up
            return summary
        embedder = lab.embedder  # loaded here, before the loader may use it
        batches = _batches(checked, batch_size)
        files = sum(isinstance(item, IngestItem) for item in checked)
        pool = None
        count = resolve_workers(workers, files)
        with lab.blobs.writing():
            try:
                if count:
                    pool = LoadingPool(
                        count,
                        max_pixels=lab.settings.max_pixels,
                        blob_root=lab.blobs.root,
                        transform=transform_for_workers(embedder),
                    )
                for loaded in _prefetch(lab, embedder, batches, register_missing_as_imported, pool):
                    _ingest_batch(
                        lab, loaded, summary, fail, register_missing_as_imported, generators
                    )
                    if progress:
                        progress(len(loaded.entries))
            finally:
                if pool is not None:
                    pool.close()
    except KeyboardInterrupt:
        raise IngestInterrupted(summary) from None
    lab.sync_index()
    return summary


def _skip_unchanged(
    lab: Lab,
    checked: list[IngestItem | IngestFailure],
    summary: IngestSummary,
    progress: Callable[[int], None] | None,
) -> list[IngestItem | IngestFailure]:
    """``checked`` less the items stored already whose files are unchanged (counted as skipped
    and unchanged in ``summary``), found without opening them: see ``pipeline/unchanged.py``."""
    positions, loadable = [], []
    for n, item in enumerate(checked):
        if isinstance(item, IngestItem):
            positions.append(n)
            loadable.append(item)
    found = unchanged_items(lab, loadable)
    if not found:
        return checked
    dropped = {positions[k] for k in found}
    summary.skipped += len(dropped)
    summary.unchanged += len(dropped)
    if progress:
        progress(len(dropped))
    return [item for n, item in enumerate(checked) if n not in dropped]


def check_items(
    lab: Lab,
    items: Iterable[IngestItem | IngestFailure],
    *,
    register_missing: bool = False,
) -> list[IngestItem | IngestFailure]:
    """The items, in order, with those the store would refuse turned into failures: a
    reference or resynthesis without a generator, a generator the lab does not know (unless
    ``register_missing``), a runnable generator's resynthesis without its seed.

    Reads the store only (one lookup per generator name); no image is opened, no model loaded.
    """
    rows: dict[str, GeneratorRow | None] = {}
    checked: list[IngestItem | IngestFailure] = []
    for item in items:
        if isinstance(item, IngestItem) and item.role in ("resynthesis", "reference"):
            try:
                _check_item(lab, item, rows, register_missing)
            except RsxError as error:
                item = IngestFailure(str(item.path), _reason(item, error))
        checked.append(item)
    return checked


def _check_item(
    lab: Lab, item: IngestItem, rows: dict[str, GeneratorRow | None], register_missing: bool
) -> None:
    if not item.generator:
        raise RsxError(f"{item.path}: a {item.role} needs a generator")
    if item.generator not in rows:
        with lab.session() as session:
            rows[item.generator] = repository.generator_by_name(session, item.generator)
    generator = rows[item.generator]
    if generator is None:
        if register_missing:
            return  # registered as imported when its batch is stored
        raise _unknown_generator(item)
    if item.role == "resynthesis":
        _check_seed_given(item, generator)


def check_plain_options(
    lab: Lab, *, role: str, generator: str | None, seed: int | None
) -> GeneratorRow | None:
    """Check what ``rsx ingest`` options give every plain file (not manifests) at once, so a
    problem is said once: the role's generator exists, and a runnable generator's resynthesis
    has its seed. Returns the generator's row (None for role 'query'). Raises RsxError."""
    if role == "query":
        return None
    if generator is None:
        raise RsxError(f"--role {role} needs --generator NAME: the generator that made the images")
    with lab.session() as session:
        row = repository.generator_by_name(session, generator)
    if row is None:
        raise RsxError(f"unknown generator {generator!r}; add it with 'rsx generator add'")
    if role == "resynthesis" and seed is None and row.kind != "imported":
        raise RsxError(
            f"a resynthesis for runnable generator {generator!r} needs the seed it was made"
            " with: give --seed N (or ingest a manifest with a seed column)"
        )
    return row


def _batches(items: Iterable[IngestItem | IngestFailure], size: int) -> Iterator[list]:
    """Runs of ``size`` items (failures ride along without counting)."""
    batch: list[IngestItem | IngestFailure] = []
    real = 0
    for item in items:
        batch.append(item)
        if isinstance(item, IngestItem):
            real += 1
        if real >= size:
            yield batch
            batch, real = [], 0
    if batch:
        yield batch


def _prefetch(
    lab: Lab,
    embedder: Embedder,
    batches: Iterator[list],
    register_missing: bool,
    pool: LoadingPool | None = None,
) -> Iterator[_Loaded]:
    """Load batches on a background thread, at most ``_QUEUE_DEPTH`` ahead of the consumer.

    Without ``pool`` the thread loads the files itself; with one, it keeps the workers one batch
    ahead of the batch it finishes (the store's checks, blob sync, pixels) and hands over."""
    done = object()
    ready: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
    stop = threading.Event()

    def hand_over(value: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def finish(batch: list, loads: list[FileLoad]) -> bool:
        return hand_over(_finish_batch(lab, embedder, batch, loads, register_missing))

    def work() -> None:
        try:
            if pool is None:
                for batch in batches:
                    loads = [
                        load_file(
                            job, max_pixels=lab.settings.max_pixels, blobs=lab.blobs, read=_read
                        )
                        for job in _jobs(batch)
                    ]
                    if not finish(batch, loads):
                        return
            else:
                pending: deque = deque()

                def finish_oldest() -> bool:
                    earlier, submitted = pending.popleft()
                    got = pool.result(submitted, stop)
                    return got is not None and finish(earlier, got)

                for batch in batches:
                    pending.append((batch, pool.submit(_jobs(batch))))
                    # the workers load this batch while the one before is finished
                    if len(pending) > 1 and not finish_oldest():
                        return
                while pending:
                    if not finish_oldest():
                        return
            hand_over(done)
        except BaseException as error:  # re-raised in the consumer
            hand_over(error)

    thread = threading.Thread(target=work, name="rsx-ingest-loader", daemon=True)
    thread.start()
    try:
        while True:
            value = ready.get()
            if value is done:
                return
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def _read(path: Path, max_pixels: int) -> LoadedImage:
    """``load_image_file``, looked up when called (a test may count the files read)."""
    return load_image_file(path, max_pixels=max_pixels)


def _jobs(batch: list) -> list[FileJob]:
    """The batch's files to load; a resynthesis's blob waits for its slot's check."""
    return [
        FileJob(item.path, item.role, item.caption, write_blob=item.role != "resynthesis")
        for item in batch
        if isinstance(item, IngestItem)
    ]


def _finish_batch(
    lab: Lab, embedder: Embedder, batch: list, loads: list[FileLoad], register_missing: bool
) -> _Loaded:
    """The batch's loads checked against the store (reads only), the blobs still unstaged
    staged, every blob of the batch put in place durably in one ``BlobStore.place``, and the
    pixels of the images not embedded yet gathered (made here when the loads did not bring them).
    A file refused here has its staged blob discarded."""
    entries: list[tuple[IngestItem, LoadedImage, Any] | IngestFailure] = []
    stats: dict[int, FileStat] = {}
    staged: dict[int, StagedBlob] = {}  # entry position -> its blob
    refused: list[StagedBlob] = []  # blobs of files refused here: not left as debris
    generators: dict[str, GeneratorRow | None] = {}  # looked up once a batch
    pixels_of: dict[str, Any] = {}
    files = iter(loads)
    try:
        for item in batch:
            if isinstance(item, IngestFailure):
                entries.append(item)
                continue
            load = next(files)
            if load.failure is not None or load.image is None:
                entries.append(IngestFailure(str(item.path), load.failure or "not loaded"))
                continue
            image = load.image
            try:
                _precheck(lab, item, image.sha256, load.caption, register_missing, generators)
                if item.role == "resynthesis":  # its slot is free: its blob goes in now
                    load.staged = lab.blobs.stage(image.sha256, image.data)
            except RsxError as error:
                if load.staged is not None:
                    refused.append(load.staged)
                entries.append(IngestFailure(str(item.path), _reason(item, error)))
                continue
            if load.before is not None:
                stats[len(entries)] = load.before
            if load.staged is not None:
                staged[len(entries)] = load.staged
            if load.pixels is not None:
                pixels_of.setdefault(image.sha256, load.pixels)
            entries.append((item, image, load.caption))
        # the batch's blobs in place and durable in one step, before any row can point at them
        placed = lab.blobs.place(list(staged.values()))
    except BaseException:
        lab.blobs.discard(load.staged for load in loads if load.staged is not None)
        raise
    lab.blobs.discard(refused)
    blob_stats = {
        position: stat
        for position, path in zip(staged, placed, strict=True)
        if (stat := stat_or_none(path)) is not None
    }
    batch_loaded = _Loaded(entries, stats=stats, blob_stats=blob_stats)
    preprocess = getattr(embedder, "preprocess_batch", None)
    if preprocess is None or not hasattr(embedder, "embed_tensors"):
        return batch_loaded
    images = {e[1].sha256: e[1] for e in entries if isinstance(e, tuple)}
    embedded = _embedded_shas(lab, list(images))
    todo = [sha for sha in images if sha not in embedded]
    if todo:
        if all(sha in pixels_of for sha in todo):  # preprocessed by the workers
            import torch

            batch_loaded.pixels = torch.from_numpy(np.stack([pixels_of[sha] for sha in todo]))
        else:
            batch_loaded.pixels = preprocess([_picture(lab, images[sha]) for sha in todo])
        batch_loaded.pixel_row = {sha: row for row, sha in enumerate(todo)}
    return batch_loaded


def _picture(lab: Lab, image: LoadedImage) -> Any:
    """The decoded picture of a loaded image; decoded again here when a worker kept it."""
    if image.image is not None:
        return image.image
    return load_image_bytes(image.data, f"image {image.sha256[:12]}", lab.settings.max_pixels).image


def _embedded_shas(lab: Lab, shas: list[str]) -> set[str]:
    """Which of these images the lab's embedder has embedded (a plain read, no write lock)."""
    if not shas:
        return set()
    with lab.session() as session:
        return embeddings.embedded_sha256s(session, shas, lab.fingerprint)


def _reason(item: IngestItem, error: RsxError) -> str:
    return str(error).removeprefix(f"{item.path}: ")


def _ingest_batch(
    lab: Lab,
    loaded: _Loaded,
    summary: IngestSummary,
    fail: Callable[[IngestFailure], None],
    register_missing: bool,
    generators: dict[str, GeneratorRow | None],
) -> None:
    """Store one batch: blobs, then every row in one transaction, then its embeddings.

    An item whose role is refused here (its slot taken by another image of this batch or of a
    concurrent writer) fails; its image row, already written, is embedded like the others so
    the store stays whole. Once the rows are committed, the digest of each item stored is
    remembered with its file's stat, and its blob's (``Lab.file_digests``), for a re-run to
    skip it unread.
    """
    resolved = []
    blobs: list[tuple[FileStat, str]] = []  # the blobs their rows will point at: stat, digest
    for position, entry in enumerate(loaded.entries):
        if isinstance(entry, IngestFailure):
            fail(entry)
            continue
        item, image, caption = entry
        try:
            generator = _generator(lab, item, summary, register_missing, generators)
        except RsxError as error:
            fail(IngestFailure(str(item.path), _reason(item, error)))
            continue
        resolved.append((item, image, generator, caption, loaded.stats.get(position)))
        if position in loaded.blob_stats:
            blobs.append((loaded.blob_stats[position], image.sha256))
    if not resolved:
        return
    pictures: dict[int, LoadedImage] = {}
    read: list[tuple[FileStat, str]] = []  # the files stored: their stat and digest
    added = skipped = 0
    with lab.session() as session:
        stored = store_images(
            lab, [entry[1] for entry in resolved], session=session, blobs_written=True
        )
        for (item, image, generator, caption, stat), (image_id, new_image) in zip(
            resolved, stored, strict=True
        ):
            pictures.setdefault(image_id, image)
            try:
                new_role = _record_role(lab, session, item, image, image_id, generator, caption)
            except RsxError as error:  # nothing of this item's role was written
                fail(IngestFailure(str(item.path), _reason(item, error)))
                continue
            if new_image or new_role:
                added += 1
            else:
                skipped += 1
            if stat is not None:
                read.append((stat, image.sha256))
        known = embeddings.embedding_ids(session, list(pictures), lab.fingerprint)
    # counted once the transaction committed: an interrupted batch counts for nothing
    summary.added += added
    summary.skipped += skipped
    # never fails the ingest: at worst the next run reads these files again
    lab.file_digests.remember(read, written=blobs)
    missing = [image_id for image_id in pictures if image_id not in known]
    if not missing:
        return
    batch_size = lab.settings.embedding_batch_size
    rows = [loaded.pixel_row.get(pictures[i].sha256) for i in missing]
    embed_tensors = getattr(lab.embedder, "embed_tensors", None)  # preprocessed on the loader
    if loaded.pixels is not None and embed_tensors and all(row is not None for row in rows):
        vectors = np.concatenate(
            [
                embed_tensors(loaded.pixels[rows[start : start + batch_size]])
                for start in range(0, len(rows), batch_size)
            ]
        )
    else:  # another process embedded or removed something meanwhile: embed from the pictures
        vectors = lab.embedder.embed(
            [_picture(lab, pictures[i]) for i in missing], batch_size=batch_size
        )
    write_embeddings(lab, missing, vectors)


def _generator(
    lab: Lab,
    item: IngestItem,
    summary: IngestSummary,
    register_missing: bool,
    generators: dict[str, GeneratorRow | None],
) -> GeneratorRow | None:
    """The generator row a reference or resynthesis names (registered as imported if asked).

    ``generators`` caches rows by name for the whole ingest (one lookup per name).
    """
    if item.role not in ("resynthesis", "reference") or item.generator is None:
        return None
    generator = generators.get(item.generator)
    if generator is None:
        with lab.session() as session:
            generator = repository.generator_by_name(session, item.generator)
    if generator is None and register_missing:
        generator = lab.add_generator(item.generator, "imported")
        summary.generators_added.append(item.generator)
    if generator is None:
        raise _unknown_generator(item)
    generators[item.generator] = generator
    return generator


def _precheck(
    lab: Lab,
    item: IngestItem,
    sha256: str,
    caption: tuple[str, str] | None,
    register_missing: bool,
    generators: dict[str, GeneratorRow | None],
) -> None:
    """Refuse, with reads of the store only, what storing would refuse: a generator the lab
    does not know, a runnable generator's resynthesis without its seed, a resynthesis slot that
    holds another image. What needs no store (the caption) was checked where the file was read
    (``loading.caption_for``), before its blob was written; a resynthesis's blob is written only
    after this check, so a refused delivery leaves no blob. ``generators``: the rows looked up
    so far (by name; filled here), so a batch asks the store once a generator."""
    generator = None
    if item.role in ("resynthesis", "reference"):
        if not item.generator:
            raise RsxError(f"{item.path}: a {item.role} needs a generator")
        if item.generator not in generators:  # the caller's lookups, one a generator
            with lab.session() as session:
                generators[item.generator] = repository.generator_by_name(session, item.generator)
        generator = generators[item.generator]
        if generator is None and not register_missing:
            raise _unknown_generator(item)
    if item.role == "resynthesis" and generator is not None and caption is not None:
        _check_seed_given(item, generator)
        if item.seed is not None:  # its slot filled by another image already: refused now
            with lab.session() as session:
                held = repository.resynthesis_in_slot(
                    session, seed=item.seed, **_slot(lab, generator, caption[0])
                )
            if held is not None and held[1] != sha256:
                raise _slot_taken(item, generator, held[1])


def _unknown_generator(item: IngestItem) -> RsxError:
    return RsxError(
        f"{item.path}: unknown generator {item.generator!r}; add it with 'rsx generator add'"
    )


def _record_role(
    lab: Lab,
    session: Session,
    item: IngestItem,
    image: LoadedImage,
    image_id: int,
    generator: GeneratorRow | None,
    caption: tuple[str, str] | None,
) -> bool:
    """Record the item's role in the batch's transaction; True when that is new.

    A refusal (a runnable generator's resynthesis without its seed, or a slot that holds another
    image) is raised before this item's role writes anything but its caption, so the rest of the
    batch is unaffected.
    """
    if item.role == "resynthesis":
        assert generator is not None and caption is not None  # made sure of by _precheck
        slot = _slot(lab, generator, caption[0])
        if repository.resynthesis_seed_of_image(session, sha256=image.sha256, **slot) is not None:
            return False  # this very image is that resynthesis already
        _check_seed_given(item, generator)
        repository.ensure_caption(session, caption[0], caption[1])
        # imported without a seed: the next ordinal (runnable ones were refused above)
        claim = repository.claim_resynthesis_slot(
            session, image_id=image_id, sha256=image.sha256, seed=item.seed, **slot
        )
        if claim.claimed:
            return True
        if claim.holder[1] == image.sha256:
            return False  # a concurrent ingest of the same file got there first
        raise _slot_taken(item, generator, claim.holder[1])
    if caption is not None:
        repository.ensure_caption(session, caption[0], caption[1])
    if item.role == "reference":
        assert generator is not None  # made sure of by _generator
        return repository.ensure_reference(
            session,
            image_id=image_id,
            generator_id=generator.id,
            caption_hash=caption[0] if caption else None,
        )
    return False


def _slot(lab: Lab, generator: GeneratorRow, caption: str) -> dict[str, Any]:
    """The slot of a resynthesis of ``caption`` by ``generator``, all but its seed."""
    return {
        "generator_id": generator.id,
        "caption_hash": caption,
        "settings_hash": factory.settings_hash(generator.kind, generator.settings_json, lab.device),
    }


def _check_seed_given(item: IngestItem, generator: GeneratorRow) -> None:
    if item.seed is None and generator.kind != "imported":
        raise RsxError(
            f"{item.path}: a resynthesis for runnable generator {generator.name!r} needs its seed"
        )


def _slot_taken(item: IngestItem, generator: GeneratorRow, held_sha256: str) -> RsxError:
    """The refusal of a resynthesis whose (generator, caption, settings, seed) holds another
    image: a slot holds one image, and which one is meant cannot be guessed."""
    remedy = "give it another seed"
    if generator.kind == "imported":
        remedy += ", or none to take the next free one"
    return RsxError(
        f"{item.path}: generator {generator.name!r} already has another image for this caption"
        f" and seed {item.seed} (image {held_sha256[:12]}); {remedy}"
    )
