"""Answering "who made this image?" for one image or many, with an audit record per answer.

1. copy each image into the lab and caption it (the source is kept);
2. reuse stored resyntheses of its caption by every candidate, generate the missing ones
   (batched per generator across all the images of the call), mark imported ones pending;
3. embed what is not embedded yet, then compare the query only with its caption's resyntheses;
4. rank, score, decide ('unknown' past the lab's threshold) and record the audit row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from resynth_index.errors import RsxError
from resynth_index.media.captions import resolve_caption
from resynth_index.media.images import LoadedImage, load_image_file
from resynth_index.media.metadata import embedded_metadata
from resynth_index.pipeline.attribution import attribute, similarity_to_distance
from resynth_index.pipeline.intake import embedding_vectors, ensure_embeddings, store_images
from resynth_index.pipeline.resynthesis import (
    ResynthesisPlan,
    generate_missing,
    plan_resyntheses,
    record_pending,
)
from resynth_index.store import audit, repository
from resynth_index.store.models import GeneratorRow
from resynth_index.store.vectors import MissingVectorsError

if TYPE_CHECKING:
    import PIL.Image

    from resynth_index.lab import Lab
    from resynth_index.models.captioners import Captioner


@dataclass
class RankedGenerator:
    generator: str
    distance: float
    score: float
    distances: list[float]
    nearest_sha256: str  # the resynthesis closest to the query (for reports)


@dataclass
class QueryResult:
    image: str
    sha256: str
    caption: str
    caption_source: str
    verdict: str
    ranking: list[RankedGenerator]
    margin: float | None
    generated: int
    reused: int
    pending: list[str]
    not_generated: list[str]  # runnable candidates skipped because generation was off
    candidates: list[str]
    distance: str
    aggregation: str
    fingerprints: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)  # embedded evidence, never trusted
    query_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The answer as ``rsx query --json`` prints it and the audit row stores it."""
        return asdict(self)


@dataclass
class QueryFailure:
    image: str
    error: str


@dataclass
class _Prepared:
    path: Path
    image_id: int
    sha256: str
    picture: PIL.Image.Image
    caption_hash: str
    caption_text: str
    caption_source: str
    metadata: dict[str, str]
    loaded: LoadedImage | None = None  # until stored


def select_candidates(lab: Lab, names: Sequence[str] | None) -> list[GeneratorRow]:
    """The named generators (each must be registered and active), or every active one."""
    active = {row.name: row for row in lab.generators()}
    if not names:
        if not active:
            raise RsxError("this lab has no generators; add one with 'rsx generator add'")
        return list(active.values())
    unknown = [n for n in names if n not in active]
    if unknown:
        raise RsxError(
            f"unknown or retired generator(s): {', '.join(unknown)}; see 'rsx generator list'"
        )
    return [active[n] for n in dict.fromkeys(names)]


def run_queries(
    lab: Lab,
    paths: Sequence[Path],
    *,
    caption: str | None = None,
    candidates: Sequence[str] | None = None,
    resyntheses: int | None = None,
    generate: bool = True,
    captioner: Captioner | None = None,
    progress: Callable[[str, int], None] | None = None,
    sync_index: bool = True,
) -> list[QueryResult | QueryFailure]:
    """Attribute each image; a bad image fails alone and the rest go on.

    Lookups read the few vectors each answer needs (from the index, or from the database for
    embeddings stored since the index was last synced); they never scan the index. With
    ``sync_index`` (the default) the index file is brought up to date once, at the end of the
    call. A long-running caller answering images one call at a time can pass ``False`` and call
    ``lab.sync_index()`` when done: per call, the index is then only read.
    """
    generators = select_candidates(lab, candidates)
    outcomes: list[QueryResult | QueryFailure | _Prepared] = []
    for path in paths:
        try:
            outcomes.append(_prepare(lab, Path(path), caption, captioner))
        except RsxError as error:
            outcomes.append(QueryFailure(image=str(path), error=str(error)))
        if progress:
            progress("prepare", 1)
    outcomes = _store_prepared(lab, outcomes)
    prepared = [o for o in outcomes if isinstance(o, _Prepared)]
    if not prepared:
        return outcomes  # type: ignore[return-value]

    captions = {p.caption_hash: p.caption_text for p in prepared}
    plan = plan_resyntheses(lab, list(captions), generators, resyntheses)
    generated_for: dict[str, int] = {}
    if generate:
        for work in plan.missing.values():
            for caption_hash, _seed in work:
                generated_for[caption_hash] = generated_for.get(caption_hash, 0) + 1
        if plan.missing_count():
            generate_missing(
                lab,
                plan,
                generators,
                captions,
                progress=(lambda n: progress("generate", n)) if progress else None,
            )
    record_pending(lab, plan, generators)

    # generated resyntheses were embedded batch by batch; what is left is the query images
    # and any stored image that lacks an embedding (loaded from its blob)
    to_embed: dict[int, PIL.Image.Image | None] = {p.image_id: p.picture for p in prepared}
    for image_ids in plan.stored.values():
        for image_id in image_ids:
            to_embed.setdefault(image_id, None)
    fresh: dict[int, np.ndarray] = {}
    embedding_of = ensure_embeddings(lab, to_embed, computed=fresh)
    vectors = _lookup_vectors(lab, [embedding_of[i] for i in to_embed], fresh)
    image_sha = dict(plan.sha256)
    image_sha.update(
        _image_shas(lab, [i for ids in plan.stored.values() for i in ids if i not in image_sha])
    )

    results: list[QueryResult | QueryFailure] = []
    answers: list[tuple[QueryResult, str, dict]] = []
    counted: set[str] = set()
    for outcome in outcomes:
        if not isinstance(outcome, _Prepared):
            results.append(outcome)
            continue
        generated = (
            0 if outcome.caption_hash in counted else generated_for.get(outcome.caption_hash, 0)
        )
        counted.add(outcome.caption_hash)
        result, distances = _answer(
            lab, outcome, generators, plan, embedding_of, vectors, image_sha, generated
        )
        results.append(result)
        answers.append((result, outcome.caption_hash, distances))
    _record_answers(lab, answers)
    if sync_index:
        lab.sync_index()
    return results


def _prepare(lab: Lab, path: Path, caption: str | None, captioner: Captioner | None) -> _Prepared:
    """Read, decode and caption one image (nothing is stored yet: see ``_store_prepared``)."""
    loaded = load_image_file(path, max_pixels=lab.settings.max_pixels)
    found = resolve_caption(
        explicit=caption,
        image_path=path,
        data=loaded.data,
        image=loaded.image,
        captioner=captioner,
    )
    return _Prepared(
        path=path,
        image_id=-1,
        sha256=loaded.sha256,
        picture=loaded.image,
        caption_hash=found.hash,
        caption_text=found.text,
        caption_source=found.source,
        metadata=embedded_metadata(loaded.data),
        loaded=loaded,
    )


def _store_prepared(lab: Lab, outcomes: list) -> list:
    """Store every prepared image (blobs, then their rows and captions in one transaction).

    Should the batch fail, each image is stored alone, so only the one at fault fails.
    """
    prepared = [o for o in outcomes if isinstance(o, _Prepared)]
    if not prepared:
        return outcomes
    try:
        _store_batch(lab, prepared)
        return outcomes
    except RsxError:
        pass
    kept = []
    for outcome in outcomes:
        if isinstance(outcome, _Prepared):
            try:
                _store_batch(lab, [outcome])
            except RsxError as error:
                outcome = QueryFailure(image=str(outcome.path), error=str(error))
        kept.append(outcome)
    return kept


def _store_batch(lab: Lab, prepared: list[_Prepared]) -> None:
    loaded = [p.loaded for p in prepared if p.loaded is not None]
    assert len(loaded) == len(prepared), "an image is stored once"
    with lab.blobs.writing(), lab.session() as session:
        stored = store_images(lab, loaded, session=session)
        for p in prepared:
            repository.ensure_caption(session, p.caption_hash, p.caption_text)
    for p, (image_id, _new) in zip(prepared, stored, strict=True):
        p.image_id = image_id
        p.loaded = None  # the bytes are in the blob store; keep only the decoded picture


def _lookup_vectors(
    lab: Lab, embedding_ids: list[int], fresh: dict[int, np.ndarray]
) -> dict[int, np.ndarray]:
    """The vectors of a few embeddings: from the index when it holds them, else the database.

    A gather by id (no scan). Embeddings stored after the index was last synced (the query
    images, fresh resyntheses) are read from the database, so the index need not change.
    """
    found: dict[int, np.ndarray] = {i: fresh[i] for i in embedding_ids if i in fresh}
    ids = np.array(sorted(set(embedding_ids) - set(found)), dtype=np.int64)
    if not len(ids):
        return found
    index = lab.index
    indexed = ids[ids <= index.watermark]
    if len(indexed):
        try:
            rows = index.vectors_for(indexed)
            found.update({int(i): row for i, row in zip(indexed, rows, strict=True)})
        except MissingVectorsError:
            pass
    rest = [int(i) for i in ids if int(i) not in found]
    found.update(embedding_vectors(lab, rest))
    return found


def _answer(
    lab: Lab,
    query: _Prepared,
    generators: Sequence[GeneratorRow],
    plan: ResynthesisPlan,
    embedding_of: dict[int, int],
    vectors: dict[int, np.ndarray],
    image_sha: dict[int, str],
    generated: int,
) -> tuple[QueryResult, dict[str, list[float]]]:
    """The answer for one prepared image, and its distances per generator (for the audit)."""
    settings = lab.settings
    per_generator: dict[str, list[int]] = {
        row.name: plan.stored.get((query.caption_hash, row.name), []) for row in generators
    }
    query_vector = vectors[embedding_of[query.image_id]].astype(np.float64)
    similarity: dict[int, float] = {}
    for image_ids in per_generator.values():
        for image_id in image_ids:
            embedding_id = embedding_of[image_id]
            if embedding_id not in similarity:
                candidate = vectors[embedding_id].astype(np.float64)
                similarity[embedding_id] = float(np.dot(query_vector, candidate))
    distances: dict[str, list[float]] = {}
    nearest: dict[str, str] = {}
    for name, image_ids in per_generator.items():
        values = [
            similarity_to_distance(similarity[embedding_of[i]], settings.distance)
            for i in image_ids
        ]
        distances[name] = values
        if values:
            nearest[name] = image_sha[image_ids[int(np.argmin(values))]]
    outcome = attribute(
        distances,
        aggregation=settings.aggregation,
        temperature=settings.temperature,
        threshold=settings.unknown_threshold,
    )
    ranking = [
        RankedGenerator(
            generator=g.generator,
            distance=g.distance,
            score=g.score,
            distances=list(g.distances),
            nearest_sha256=nearest[g.generator],
        )
        for g in outcome.ranking
    ]
    reused = sum(len(v) for v in per_generator.values()) - generated
    fingerprints = {
        "embedder": lab.fingerprint,
        **{row.name: row.fingerprint for row in generators},
    }
    result = QueryResult(
        image=str(query.path),
        sha256=query.sha256,
        caption=query.caption_text,
        caption_source=query.caption_source,
        verdict=outcome.verdict,
        ranking=ranking,
        margin=outcome.margin,
        generated=generated,
        reused=max(reused, 0),
        pending=sorted(plan.pending.get(query.caption_hash, [])),
        not_generated=sorted(
            name
            for name, work in plan.missing.items()
            if any(caption == query.caption_hash for caption, _ in work)
        ),
        candidates=[row.name for row in generators],
        distance=settings.distance,
        aggregation=settings.aggregation,
        fingerprints=fingerprints,
        metadata=query.metadata,
    )
    return result, distances


def _record_answers(lab: Lab, answers: list[tuple[QueryResult, str, dict]]) -> None:
    """The audit rows of a call's answers, in one transaction; each result gets its query_id,
    and each row's stored answer holds it too.

    ``answers`` holds (result, caption hash, distances per generator).
    """
    if not answers:
        return
    with lab.session() as session:
        for result, caption_hash, distances in answers:
            result.query_id = audit.record_query(
                session, answer=result.to_json(), caption_hash=caption_hash, distances=distances
            )


def _image_shas(lab: Lab, image_ids: list[int]) -> dict[int, str]:
    if not image_ids:
        return {}
    with lab.session() as session:
        return repository.image_sha256s(session, image_ids)
