"""Making the missing resyntheses of a plan: one generation loop, wherever the batches run.

Generation is the dominant cost of the method, so it is batched: the missing work of every
caption in a call is grouped per generator and made ``batch_size`` images at a time. Where the
batches are generated is a ``BatchRunner``'s business: ``LocalBatches`` (this process, one
generator after another) or the Ray executor (``distributed/executor.py``: actors, several at
once). Everything else is this module's, the same for both: batch sizes checked, progress
reported, each batch stored whole (blobs, then its image and resynthesis rows in one
transaction, then its embeddings) as it lands, its image ids joining the plan in seed order. A
batch is stored by a writer thread while the next is generated when its generator runs on an
accelerator, in line before the next is begun otherwise (``pipeline/batch_writer``); its
pictures are then dropped: memory holds two batches at most, and an interrupted run keeps every
batch it generated.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from resynth_index.errors import RsxError
from resynth_index.hashing import hash_bytes
from resynth_index.media.images import LoadedImage
from resynth_index.pipeline.batch_writer import (
    BatchWriter,
    interrupts_deferred,
    stores_beside_generation,
)
from resynth_index.pipeline.intake import encode_png, store_images, write_embeddings
from resynth_index.pipeline.plans import (
    ProgressCallback,
    ProgressEvent,
    ResynthesisPlan,
    ResynthesizeSummary,
    lab_settings_hash,
    plan_captions,
)
from resynth_index.store import embeddings, repository
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    import PIL.Image

    from resynth_index.lab import Lab


def store_resyntheses(
    lab: Lab,
    row: GeneratorRow,
    settings_hash: str,
    chunk: Sequence[tuple[str, int]],
    images: Sequence[PIL.Image.Image],
    sha256_of: dict[int, str] | None = None,
    *,
    on_committed: Callable[[], None] | None = None,
) -> list[int]:
    """Store one generated batch: blobs, then image + resynthesis rows in one transaction,
    then the batch's embeddings. Returns the image ids in ``chunk`` order.

    ``on_committed`` is called once the rows' transaction has committed, before embedding.

    Should another process have stored one of these resyntheses first (same generator, caption,
    settings and seed: the insert is then ignored), the image of the row that won is returned for
    it, so the caller never holds an image that no resynthesis row stands behind.
    """
    loaded = []
    for image in images:
        data = encode_png(image)
        loaded.append(
            LoadedImage(
                sha256=hash_bytes(data),
                data=data,
                format="PNG",
                width=image.width,
                height=image.height,
                image=image,
            )
        )
    sha256_of = {} if sha256_of is None else sha256_of
    # the writers' lock is held until the batch's embeddings are stored: until then its images
    # lack one, which `rsx check` must not take for damage (nor "repair")
    with lab.blobs.writing():
        return _store_and_embed(lab, row, settings_hash, chunk, loaded, sha256_of, on_committed)


def _store_and_embed(
    lab: Lab,
    row: GeneratorRow,
    settings_hash: str,
    chunk: Sequence[tuple[str, int]],
    loaded: list[LoadedImage],
    sha256_of: dict[int, str],
    on_committed: Callable[[], None] | None,
) -> list[int]:
    """``store_resyntheses`` under the writers' lock: the rows in one transaction, then the
    embeddings of the images it stored."""
    with lab.session() as session:
        stored = store_images(lab, loaded, session=session)
        made = [image_id for image_id, _new in stored]
        sha256_of.update((i, item.sha256) for i, item in zip(made, loaded, strict=True))
        image_ids = list(made)
        for n, ((caption, seed), image_id) in enumerate(zip(chunk, made, strict=True)):
            claim = repository.claim_resynthesis_slot(
                session,
                image_id=image_id,
                sha256=sha256_of[image_id],
                seed=seed,
                generator_id=row.id,
                caption_hash=caption,
                settings_hash=settings_hash,
            )
            if not claim.claimed:  # another writer stored this slot first: its image stands
                image_ids[n], sha256_of[claim.holder[0]] = claim.holder
        known = embeddings.embedding_ids(session, made, lab.fingerprint)
    if on_committed is not None:
        on_committed()
    # every image stored here is embedded (a race's loser too, so no image lacks an embedding);
    # two seeds can draw the same picture: embed each distinct new image once
    to_embed = [i for i in dict.fromkeys(made) if i not in known]
    if to_embed:
        picture = {image_id: item.image for image_id, item in zip(made, loaded, strict=True)}
        vectors = lab.embedder.embed(
            [picture[i] for i in to_embed], batch_size=lab.settings.embedding_batch_size
        )
        write_embeddings(lab, to_embed, vectors)
    return image_ids


def record_pending(lab: Lab, plan: ResynthesisPlan, generators: Sequence[GeneratorRow]) -> None:
    """Write a work order for every (imported generator, caption) still lacking a resynthesis."""
    if not any(plan.pending.values()):
        return
    by_name = {row.name: row for row in generators}
    with lab.session() as session:
        for caption, names in plan.pending.items():
            for name in names:
                repository.add_pending(session, by_name[name].id, caption)


# ------------------------------------------------------------------ the generation loop
@dataclass(frozen=True)
class BatchTask:
    """One batch of one generator's work: ``chunk`` of the ``of`` (caption, seed) pairs it needs,
    generated ``batch_size`` at a time (``chunk`` is one batch or less)."""

    row: GeneratorRow
    chunk: list[tuple[str, int]]
    of: int
    batch_size: int


@dataclass
class GeneratedBatch:
    """A batch's pictures, in ``task.chunk`` order; ``beside``: it may be stored on the writer
    thread while the next batch is generated (its generator runs on an accelerator here)."""

    task: BatchTask
    images: list[PIL.Image.Image]
    beside: bool = False


@dataclass(frozen=True)
class RunHooks:
    """What a runner tells the loop as it goes: a generator's work begins (``announce(name,
    total)``, before its model loads or its first task leaves), the batch size a generator
    runs with (``sized``); and ``settle``, which waits for every batch handed over to be stored
    (a runner calls it before it begins the next generator in this process)."""

    announce: Callable[[str, int], None]
    sized: Callable[[str, int], None]
    settle: Callable[[], None]


class BatchRunner(Protocol):
    """Where a plan's batches are generated. ``run`` yields each generated batch; the loop
    stores it before asking for the next (or hands it to its writer thread, ``beside``)."""

    def run(
        self,
        work: Mapping[str, list[tuple[str, int]]],
        rows: Mapping[str, GeneratorRow],
        captions: Mapping[str, str],
        setting: int | str,
        hooks: RunHooks,
    ) -> Iterator[GeneratedBatch]: ...


class LocalBatches:
    """Generates in this process, one generator after another: its model loaded (once per lab),
    "auto" resolved for it where it runs (``models.generators.batching``), then its batches."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def run(
        self,
        work: Mapping[str, list[tuple[str, int]]],
        rows: Mapping[str, GeneratorRow],
        captions: Mapping[str, str],
        setting: int | str,
        hooks: RunHooks,
    ) -> Iterator[GeneratedBatch]:
        from resynth_index.models.generators.batching import generator_device, resolve_batch_size
        from resynth_index.models.generators.protocol import GenerationRequest

        for name, pairs in work.items():
            hooks.settle()  # the generator before is wholly stored before this one is announced
            hooks.announce(name, len(pairs))
            model = self.lab.generator_model(rows[name])
            size = resolve_batch_size(setting, model)
            hooks.sized(name, size)
            beside = stores_beside_generation(generator_device(model))
            for start in range(0, len(pairs), size):
                chunk = list(pairs[start : start + size])
                requests = [GenerationRequest(captions[c], seed) for c, seed in chunk]
                images = model.generate(requests, batch_size=size)
                yield GeneratedBatch(BatchTask(rows[name], chunk, len(pairs), size), images, beside)


def generate_missing(
    lab: Lab,
    plan: ResynthesisPlan,
    generators: Sequence[GeneratorRow],
    caption_texts: dict[str, str],
    *,
    runner: BatchRunner | None = None,
    batch_size: int | str | None = None,
    progress: Callable[[int], None] | None = None,
    events: ProgressCallback | None = None,
) -> list[int]:
    """Generate every missing resynthesis of ``plan`` (on ``runner``: this process by default),
    storing each batch as it lands. Returns the image ids generated. The plan is updated in
    place: generated images join ``stored`` in seed order, ``missing`` is emptied, and
    ``batch_sizes`` says the batch each generator ran with.

    ``batch_size`` None takes the lab's ``generation_batch_size``; "auto" (its default) is
    resolved per generator where it runs. ``progress(n)`` is told the size of each batch once it
    is stored and embedded. ``events`` gets a ``generate`` ``ProgressEvent`` per generator as its
    work begins (``done`` 0) and after each of its batches is committed, so an interrupted
    caller that counted them knows how many resyntheses were kept.
    """
    from resynth_index.models.generators.batching import is_auto

    setting = batch_size or lab.settings.generation_batch_size
    if not is_auto(setting) and int(setting) < 1:
        raise RsxError(f"batch size must be at least 1, not {setting}")
    work = {name: pairs for name, pairs in plan.missing.items() if pairs}
    rows = {row.name: row for row in generators}
    settings_hashes = {name: lab_settings_hash(lab, rows[name]) for name in work}
    events = _one_at_a_time(events)
    progress = _one_at_a_time(progress)
    landing = _Landing(plan)
    made: list[int] = []
    generated: dict[str, int] = defaultdict(int)

    def announce(name: str, total: int) -> None:
        if events is not None:
            events(ProgressEvent("generate", 0, total, name))

    def store(batch: GeneratedBatch, committed: Callable[[], None] | None) -> None:
        task = batch.task
        image_ids = store_resyntheses(
            lab,
            task.row,
            settings_hashes[task.row.name],
            task.chunk,
            batch.images,
            plan.sha256,
            on_committed=committed,
        )
        landing.add(task.row.name, task.chunk, image_ids)
        made.extend(image_ids)
        if progress is not None:
            progress(len(task.chunk))

    with BatchWriter() as writer:
        hooks = RunHooks(announce, plan.batch_sizes.__setitem__, writer.wait)
        for batch in (runner or LocalBatches(lab)).run(work, rows, caption_texts, setting, hooks):
            name = batch.task.row.name
            generated[name] += len(batch.task.chunk)
            committed = None
            if events is not None:
                done = ProgressEvent("generate", generated[name], batch.task.of, name)
                committed = partial(events, done)
            beside = batch.beside
            job = partial(store, batch, committed)
            del batch  # the job holds the pictures until they are stored
            if beside:  # stored while the next batch is generated
                writer.submit(job)
            else:  # stored here, before the next batch is begun; Ctrl-C waits for it
                with interrupts_deferred():
                    job()
    plan.missing.clear()
    return made


class _Landing:
    """Puts each stored batch's image ids into ``plan.stored`` in seed order after the ones the
    plan found, whatever order the batches land in (a runner may finish them out of order): an
    answer lists its distances to a generator's resyntheses in that order, and the audit keeps
    it."""

    def __init__(self, plan: ResynthesisPlan) -> None:
        self.plan = plan
        self._seeds: dict[tuple[str, str], list[int]] = defaultdict(list)  # landed, sorted

    def add(self, name: str, chunk: Sequence[tuple[str, int]], image_ids: Sequence[int]) -> None:
        for (caption, seed), image_id in zip(chunk, image_ids, strict=True):
            seeds = self._seeds[(caption, name)]
            place = bisect.bisect(seeds, seed)
            seeds.insert(place, seed)
            stored = self.plan.stored[(caption, name)]
            stored.insert(len(stored) - (len(seeds) - 1) + place, image_id)


def _one_at_a_time(callback: Callable[..., None] | None) -> Callable[..., None] | None:
    """``callback`` behind a lock: the writer thread and the caller both report progress."""
    if callback is None:
        return None
    lock = threading.Lock()

    def serialised(*args: Any) -> None:
        with lock:
            callback(*args)

    return serialised


def resynthesize(
    lab: Lab,
    captions: dict[str, str],
    generators: Sequence[GeneratorRow],
    *,
    runner: BatchRunner | None = None,
    batch_size: int | str | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    events: ProgressCallback | None = None,
) -> ResynthesizeSummary:
    """Make every missing resynthesis of ``captions`` (hash -> text) by ``generators`` (on
    ``runner``: this process by default).

    Captions are recorded first; ``on_plan(n)`` is told how many images will be generated before
    the first one is; ``progress(n)`` after each stored batch; ``events`` as ``generate_missing``
    tells them.
    """
    plan, summary = plan_captions(lab, captions, generators)
    if on_plan is not None:
        on_plan(summary.generated)
    if summary.generated:
        generate_missing(
            lab,
            plan,
            generators,
            captions,
            runner=runner,
            batch_size=batch_size,
            progress=progress,
            events=events,
        )
        summary.batch_sizes = dict(plan.batch_sizes)
        lab.sync_index()
    return summary
