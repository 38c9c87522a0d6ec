"""Which resyntheses a set of captions needs, which are already stored, and making the rest.

A resynthesis is keyed by (generator, caption hash, generation-settings hash, seed). A runnable
generator with K resyntheses per caption needs seeds 0..K-1; whatever of those is stored is
reused, the rest is generated in batches per generator. An imported generator cannot run: any
resynthesis supplied for the caption counts, and a caption it lacks becomes a work order.

Generation is the dominant cost of the method, so it is batched: the missing work of every
caption in a call is grouped per generator and made ``batch_size`` images at a time. Each batch
is stored whole (blobs, then its image and resynthesis rows in one transaction, then its
embeddings) as it lands (``pipeline/batch_writer``): by a writer thread while the next batch is
generated when the generator runs on an accelerator, in line before the next batch is begun when
it runs on the CPU (where the two would fight for the same cores). Its pictures are then
dropped: memory holds two batches at most, and an interrupted run keeps every batch it generated.

Generation can run for minutes, so it reports as it goes, through plain callbacks (no terminal
code here): ``ProgressEvent`` says which stage, which generator and how far, and
``PlannedGenerations`` says how much will be generated before the first image is.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resynth_index.errors import RsxError, StoreError
from resynth_index.hashing import hash_bytes
from resynth_index.media.captions import caption_hash
from resynth_index.media.images import LoadedImage
from resynth_index.media.text import normalise_caption
from resynth_index.models.generators import factory
from resynth_index.pipeline.batch_writer import (
    BatchWriter,
    interrupts_deferred,
    stores_beside_generation,
)
from resynth_index.pipeline.intake import encode_png, store_images, write_embeddings
from resynth_index.pipeline.work_orders import restore_cell
from resynth_index.store import audit, embeddings, repository
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    import PIL.Image

    from resynth_index.lab import Lab

Key = tuple[str, str]  # (caption hash, generator name)


@dataclass(frozen=True)
class ProgressEvent:
    """How far a long step has come: ``done`` of ``total`` units of ``stage``.

    Stages: ``load`` (images read and captioned), ``generate`` (resyntheses made and stored by
    ``generator``, reported once before its first batch with ``done`` 0 and then after each batch
    is committed), ``embed`` (images embedded). ``done`` only grows within a stage (and generator).
    """

    stage: str
    done: int
    total: int
    generator: str | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class PlannedGenerations:
    """What a plan will generate: ``total`` images, made by ``generators`` for ``captions``.

    ``resyntheses`` is each of those generators' K (resyntheses per caption); ``stored`` counts
    the resyntheses of those generators and captions that are already stored and will be reused,
    so ``total + stored == sum(K of each generator) * captions``.
    """

    total: int
    generators: tuple[str, ...]
    resyntheses: dict[str, int]
    captions: int
    stored: int


@dataclass
class ResynthesisPlan:
    """Stored resynthesis images per (caption, generator), what is missing, what is pending."""

    stored: dict[Key, list[int]] = field(default_factory=lambda: defaultdict(list))
    missing: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    pending: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    sha256: dict[int, str] = field(default_factory=dict)  # of every stored image in the plan
    wanted: dict[str, int] = field(default_factory=dict)  # generator -> K, resyntheses/caption
    # generator -> the batch it was generated in (filled by generate_missing; "auto" resolved)
    batch_sizes: dict[str, int] = field(default_factory=dict)

    def missing_count(self) -> int:
        """How many resyntheses are still to be generated."""
        return sum(len(v) for v in self.missing.values())

    def planned(self) -> PlannedGenerations:
        """What generating the missing resyntheses amounts to (see ``PlannedGenerations``)."""
        names = tuple(name for name, work in self.missing.items() if work)
        captions = {caption for name in names for caption, _seed in self.missing[name]}
        stored = sum(
            len(self.stored.get((caption, name), ())) for name in names for caption in captions
        )
        return PlannedGenerations(
            total=self.missing_count(),
            generators=names,
            resyntheses={name: self.wanted.get(name, 0) for name in names},
            captions=len(captions),
            stored=stored,
        )


def plan_resyntheses(
    lab: Lab,
    caption_hashes: Sequence[str],
    generators: Sequence[GeneratorRow],
    resyntheses: int | None = None,
) -> ResynthesisPlan:
    """Sort every (caption, candidate) into reused, missing (to generate) or pending (imported)."""
    plan = ResynthesisPlan()
    captions = list(dict.fromkeys(caption_hashes))
    by_id = {row.id: row for row in generators}
    rows: list[repository.StoredResynthesis] = []
    if captions and by_id:  # plain column rows: no ORM objects to build on the warm path
        with lab.session() as session:
            rows = repository.stored_resyntheses(session, captions, list(by_id))
    found: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)  # -> seed -> image id
    settings_hashes = {row.id: _settings_hash(lab, row) for row in generators}
    for row in rows:
        if row.settings_hash == settings_hashes[row.generator_id]:
            found[(row.caption_hash, row.generator_id)][row.seed] = row.image_id
            plan.sha256[row.image_id] = row.sha256
    wanted_of = {
        row.id: resyntheses or factory.resyntheses_per_caption(row.settings_json)
        for row in generators
    }
    plan.wanted = {row.name: wanted_of[row.id] for row in generators}
    for caption in captions:
        for generator in generators:
            wanted = wanted_of[generator.id]
            have = found.get((caption, generator.id), {})
            key = (caption, generator.name)
            if generator.kind == "imported":
                plan.stored[key] = [have[s] for s in sorted(have)][:wanted]
                if not have:
                    plan.pending[caption].append(generator.name)
                continue
            for seed in range(wanted):
                if seed in have:
                    plan.stored[key].append(have[seed])
                else:
                    plan.missing[generator.name].append((caption, seed))
    return plan


def generate_missing(
    lab: Lab,
    plan: ResynthesisPlan,
    generators: Sequence[GeneratorRow],
    caption_texts: dict[str, str],
    *,
    batch_size: int | str | None = None,
    progress: Callable[[int], None] | None = None,
    events: ProgressCallback | None = None,
) -> list[int]:
    """Generate every missing resynthesis, batched per generator; store each batch as it lands.

    A batch is stored and embedded, then let go: on an accelerator by a writer thread
    (``BatchWriter``) while the next one is generated (at most two batches of pictures are alive
    at a time, and generation waits for storage only when storing is the slower of the two), on
    the CPU here, before the next one is begun, with Ctrl-C held back until it is stored
    (``stores_beside_generation``, ``interrupts_deferred``). Returns the image ids generated.
    The plan is updated in place: generated images join ``stored`` and ``missing`` is emptied.

    ``batch_size`` None takes the lab's ``generation_batch_size``; "auto" (its default) is
    resolved per generator where it runs (``models.generators.batching``), after its model is
    built; the batch each generator used lands in ``plan.batch_sizes``.

    ``progress(n)`` is told the size of each batch once it is stored and embedded. ``events``
    gets a ``generate`` ``ProgressEvent`` per generator before its model is loaded (``done`` 0)
    and after each of its batches is committed, so an interrupted caller that counted them knows
    how many resyntheses were kept.
    """
    from resynth_index.models.generators.batching import (
        generator_device,
        is_auto,
        resolve_batch_size,
    )
    from resynth_index.models.generators.protocol import GenerationRequest

    setting = batch_size or lab.settings.generation_batch_size
    if not is_auto(setting) and int(setting) < 1:
        raise RsxError(f"batch size must be at least 1, not {setting}")
    by_name = {row.name: row for row in generators}
    made: list[int] = []
    events = _one_at_a_time(events)
    progress = _one_at_a_time(progress)

    def store(
        name: str,
        row: GeneratorRow,
        row_settings: str,
        chunk: list[tuple[str, int]],
        images: list[PIL.Image.Image],
        committed: Callable[[], None] | None,
    ) -> None:
        image_ids = store_resyntheses(
            lab, row, row_settings, chunk, images, plan.sha256, on_committed=committed
        )
        for (caption, _seed), image_id in zip(chunk, image_ids, strict=True):
            plan.stored[(caption, name)].append(image_id)
        made.extend(image_ids)
        if progress is not None:
            progress(len(chunk))

    with BatchWriter() as writer:
        for name, work in plan.missing.items():
            if not work:
                continue
            row = by_name[name]
            writer.wait()  # the generator before is wholly stored before this one is announced
            if events is not None:
                events(ProgressEvent("generate", 0, len(work), name))
            model = lab.generator_model(row)
            size = plan.batch_sizes[name] = resolve_batch_size(setting, model)
            beside = stores_beside_generation(generator_device(model))
            row_settings = _settings_hash(lab, row)
            for start in range(0, len(work), size):
                chunk = work[start : start + size]
                requests = [GenerationRequest(caption_texts[c], seed) for c, seed in chunk]
                images = model.generate(requests, batch_size=size)
                committed = None
                if events is not None:
                    done = ProgressEvent("generate", start + len(chunk), len(work), name)
                    committed = partial(events, done)
                job = partial(store, name, row, row_settings, chunk, images, committed)
                del images  # the job holds them until they are stored
                if beside:  # stored while the next batch is generated
                    writer.submit(job)
                else:  # on the CPU: stored here, before the next batch is begun
                    with interrupts_deferred():
                        job()
    plan.missing.clear()
    return made


def _one_at_a_time(callback: Callable[..., None] | None) -> Callable[..., None] | None:
    """``callback`` behind a lock: the writer thread and the caller both report progress."""
    if callback is None:
        return None
    import threading

    lock = threading.Lock()

    def serialised(*args: Any) -> None:
        with lock:
            callback(*args)

    return serialised


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
            slot: dict[str, Any] = {
                "generator_id": row.id,
                "caption_hash": caption,
                "settings_hash": settings_hash,
                "seed": seed,
            }
            if repository.ensure_resynthesis(session, image_id=image_id, **slot):
                continue
            winner = repository.resynthesis_in_slot(session, **slot)
            if winner is None:  # pragma: no cover - the conflicting row cannot vanish mid-write
                raise StoreError(f"resynthesis {caption[:12]}/{row.name}/{seed} vanished")
            image_ids[n], sha256_of[winner[0]] = winner
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


# ------------------------------------------------------------------ precomputing (rsx resynthesize)
@dataclass
class ResynthesizeSummary:
    captions: int = 0
    generators: list[str] = field(default_factory=list)
    generated: int = 0
    reused: int = 0
    # generator -> images per batch it was generated in ("auto" resolved); empty: none generated
    batch_sizes: dict[str, int] = field(default_factory=dict)


def read_captions_file(path: Path) -> list[str]:
    """Captions from a file: one per line, or a CSV (``.csv``) with a ``caption`` column."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or "caption" not in reader.fieldnames:
                    raise RsxError(f"{path}: a captions CSV needs a 'caption' column")
                texts = [restore_cell(record.get("caption") or "") for record in reader]
        else:
            texts = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RsxError(f"{path}: no such captions file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RsxError(f"{path}: cannot read captions: {error}") from None
    captions = [normalise_caption(t) for t in texts]
    return list(dict.fromkeys(c for c in captions if c))


def pending_captions(lab: Lab) -> dict[str, str]:
    """Every caption a query has asked for: caption hash -> text, oldest first."""
    with lab.session() as session:
        return audit.captions_asked(session)


def runnable_generators(lab: Lab, name: str | None = None) -> list[GeneratorRow]:
    """The active generators the lab can run, or just the one named (which must be one)."""
    active = lab.generators()
    if name is not None:
        chosen = [row for row in active if row.name == name]
        if not chosen:
            raise RsxError(f"no active generator named {name!r}; see 'rsx generator list'")
        if chosen[0].kind == "imported":
            raise RsxError(
                f"{name!r} is an imported generator: rsx cannot run it (see 'rsx export-prompts')"
            )
        return chosen
    runnable = [row for row in active if row.kind != "imported"]
    if not runnable:
        raise RsxError("this lab has no runnable generator; add one with 'rsx generator add'")
    return runnable


def plan_captions(
    lab: Lab, captions: dict[str, str], generators: Sequence[GeneratorRow]
) -> tuple[ResynthesisPlan, ResynthesizeSummary]:
    """Record the captions, then plan their resyntheses: what is stored, what must be made.

    Shared by the local path and the Ray executor, so both plan (and count) the same work.
    """
    with lab.session() as session:
        for digest, text in captions.items():
            repository.ensure_caption(session, digest, text)
    plan = plan_resyntheses(lab, list(captions), generators)
    summary = ResynthesizeSummary(
        captions=len(captions),
        generators=[row.name for row in generators],
        reused=sum(len(v) for v in plan.stored.values()),
        generated=plan.missing_count(),
    )
    return plan, summary


def resynthesize(
    lab: Lab,
    captions: dict[str, str],
    generators: Sequence[GeneratorRow],
    *,
    batch_size: int | str | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> ResynthesizeSummary:
    """Make every missing resynthesis of ``captions`` (hash -> text) by ``generators``.

    Captions are recorded first; ``on_plan(n)`` is told how many images will be generated before
    the first one is; ``progress(n)`` after each stored batch.
    """
    plan, summary = plan_captions(lab, captions, generators)
    if on_plan is not None:
        on_plan(summary.generated)
    if summary.generated:
        generate_missing(lab, plan, generators, captions, batch_size=batch_size, progress=progress)
        summary.batch_sizes = dict(plan.batch_sizes)
        lab.sync_index()
    return summary


def _settings_hash(lab: Lab, row: GeneratorRow) -> str:
    """The settings part of ``row``'s resynthesis cache key as this lab runs it."""
    return factory.settings_hash(row.kind, row.settings_json, lab.device)


def captions_by_hash(texts: Sequence[str]) -> dict[str, str]:
    """caption hash -> normalised text, for captions given as text."""
    return {caption_hash(text): normalise_caption(text) for text in texts}
