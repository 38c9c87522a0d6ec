"""Answering "who made this image?" for one image or many, with an audit record per answer.

1. copy each image into the lab and caption it (the source is kept);
2. reuse stored resyntheses of its caption by every candidate, generate the missing ones
   (batched per generator across all the images of the call), mark imported ones pending;
3. embed what is not embedded yet, then compare the query only with its caption's resyntheses;
4. rank, score, decide (a generator, or 'inconclusive' under the lab's margin floor, 'unknown'
   past its threshold, 'no-evidence' with nothing to compare) and record the audit row, which
   holds the answer whole: how firm it is and what reproduces it (settings, seeds, versions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from resynth_index import __version__
from resynth_index.attribution.answer import (
    QueryFailure,
    QueryResult,
    RankedGenerator,
    score_meaning,
)
from resynth_index.attribution.calibration import sets as calibration_sets
from resynth_index.attribution.calibration.fusion_weights import QueryFusion, fusion_for_query
from resynth_index.attribution.combination import QUERY_METHODS, apply_fusion
from resynth_index.attribution.evidence.layers import layer_distances, layer_reader, layer_signal
from resynth_index.attribution.evidence.reconstruction import query_reconstruction, scorer_for
from resynth_index.attribution.evidence.resynthesis import resynthesis_distances
from resynth_index.attribution.verdict import attribute
from resynth_index.errors import RsxError, StoreError
from resynth_index.media.captions import resolve_caption
from resynth_index.media.folders import walk_files
from resynth_index.media.images import IMAGE_SUFFIXES, LoadedImage, load_image_file
from resynth_index.media.metadata import embedded_metadata
from resynth_index.models.generators import factory
from resynth_index.pipeline.intake import ensure_embeddings, store_images
from resynth_index.pipeline.plans import (
    PlannedGenerations,
    ProgressCallback,
    ProgressEvent,
    ResynthesisPlan,
    plan_resyntheses,
)
from resynth_index.pipeline.resynthesis import generate_missing, record_pending
from resynth_index.store import audit, embeddings, repository
from resynth_index.store.models import GeneratorRow
from resynth_index.store.vectors import MissingVectorsError

if TYPE_CHECKING:
    import PIL.Image

    from resynth_index.lab import Lab
    from resynth_index.media.captions import Captioner


class MissingGenerator(Protocol):
    """What makes a plan's missing resyntheses (``pipeline.resynthesis.generate_missing``)."""

    def __call__(
        self,
        lab: Lab,
        plan: ResynthesisPlan,
        generators: Sequence[GeneratorRow],
        caption_texts: dict[str, str],
        *,
        events: ProgressCallback | None = None,
    ) -> list[int]: ...


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
    """The named generators (each must be registered and active); else the lab's default
    candidates ('rsx config set default_candidates'), else every active generator."""
    active = {row.name: row for row in lab.generators()}
    if not names and lab.settings.default_candidates:
        names = lab.settings.default_candidates
        gone = [n for n in names if n not in active]
        if gone:
            raise RsxError(
                f"the lab's default candidates name retired or unknown generator(s):"
                f" {', '.join(gone)}; change them with 'rsx config set default_candidates'"
            )
    if not names:
        if not active:
            raise RsxError("this lab has no generators; add one with 'rsx generator add'")
        return list(active.values())
    unknown = [n for n in names if n not in active]
    if unknown:
        raise RsxError(
            f"unknown or retired generator(s): {', '.join(unknown)}; see 'rsx generator list"
            " --all' (a retired one comes back with 'rsx generator restore NAME')"
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
    progress: ProgressCallback | None = None,
    on_plan: Callable[[PlannedGenerations], None] | None = None,
    image_captions: Mapping[Path, str] | None = None,
    image_names: Mapping[Path, str] | None = None,
    method: str = "resynthesis",
    generator: MissingGenerator | None = None,
    fusion_layers: Sequence[int] | None = None,
) -> list[QueryResult | QueryFailure]:
    """Attribute each image; a bad image fails alone and the rest go on.

    ``paths`` may name folders (their image files are queried, see ``expand_query_paths``).
    With ``generate`` the runnable candidates' missing resyntheses are made and the imported
    ones' recorded as work orders (``rsx export-prompts``); without it (``--no-generate``:
    stored resyntheses only) nothing is made and no work order is recorded either.
    ``progress`` receives ``ProgressEvent``s: ``load`` per image read and captioned, ``generate``
    per generator and batch (see ``generate_missing``), ``embed`` around the final embedding.
    With generation on, ``on_plan`` is told what will be generated once every image is read and
    captioned, before anything is stored: it may raise to refuse, and then nothing is written.
    ``image_captions`` gives some paths their own explicit caption (it wins over ``caption``),
    so one call answers images asked about with different captions (``rsx serve`` batches
    them); ``image_names`` names some paths in their answers and audit rows (default: the path).

    Lookups read the few vectors each answer needs by id, from the database (or from an index
    the process already holds in memory, as ``rsx serve`` does): a query costs the same in a lab
    of ten vectors or a million. It never opens, hashes or writes the index file, which would
    be O(N): the embeddings it stores (the query images, fresh resyntheses) join the index at
    the next sync (an ingest, ``rsx index sync``, ``lab.sync_index()``, an idle service).

    ``generator`` makes the missing resyntheses in place of ``generate_missing`` (its
    contract: fill ``plan.stored``, empty ``plan.missing``, report through ``events``): the
    Ray executor's, for ``rsx query --executor ray``.

    ``method`` "fused" adds the reconstruction signal of each candidate's autoencoder (and the
    ``layer-N`` signals, ``pipeline/layers.py``) and ranks by the fused score
    (``pipeline/fusion_query.py``), with the weights the lab recorded for these candidates
    (``rsx calibrate --method fused``, ``pipeline/fusion_lab.py``) or else fixed equal ones;
    the answer records each signal's values and where the weights came from.
    ``fusion_layers``: the blocks to fuse (None: those of the recorded fusion, if any).
    """
    if method not in QUERY_METHODS:
        raise RsxError(f"unknown query method {method!r}: use {', '.join(QUERY_METHODS)}")
    if fusion_layers and method != "fused":
        raise RsxError("fusion layers apply to --method fused only")
    if fusion_layers:
        layer_reader(lab, fusion_layers)  # a block the embedder lacks: refused before any work
    generators = select_candidates(lab, candidates)
    items = expand_query_paths(paths)
    if paths and not items:
        raise RsxError("no image files among the paths given")
    total = sum(isinstance(item, Path) for item in items)
    loaded = 0
    outcomes: list[QueryResult | QueryFailure | _Prepared] = []
    for item in items:
        if isinstance(item, QueryFailure):  # a folder that cannot be listed
            outcomes.append(item)
            continue
        try:
            explicit = image_captions.get(item, caption) if image_captions else caption
            outcomes.append(_prepare(lab, item, explicit, captioner))
        except RsxError as error:  # the image is named once, in ``image``, not again in ``error``
            reason = str(error).removeprefix(f"{item}: ")
            outcomes.append(QueryFailure(image=str(item), error=reason))
        loaded += 1
        if progress:
            progress(ProgressEvent("load", loaded, total))
    prepared = [o for o in outcomes if isinstance(o, _Prepared)]
    if not prepared:
        return outcomes  # type: ignore[return-value]
    # planned from the captions alone (reads only), so a refusal leaves nothing written
    plan = plan_resyntheses(lab, [p.caption_hash for p in prepared], generators, resyntheses)
    if generate and on_plan is not None:
        on_plan(plan.planned())
    # the writers' lock from the first blob to the last embedding: until then a stored image
    # may lack its embedding, which `rsx check` must not take for damage (nor "repair")
    with lab.blobs.writing():
        outcomes = _store_prepared(lab, outcomes)
        kept = [o for o in outcomes if isinstance(o, _Prepared)]
        if not kept:
            return outcomes  # type: ignore[return-value]
        if len(kept) < len(prepared):  # an image could not be stored: plan for the others only
            plan = plan_resyntheses(lab, [p.caption_hash for p in kept], generators, resyntheses)
        prepared = kept

        captions = {p.caption_hash: p.caption_text for p in prepared}
        generated_for: dict[str, int] = {}
        if generate:
            for work in plan.missing.values():
                for caption_hash, _seed in work:
                    generated_for[caption_hash] = generated_for.get(caption_hash, 0) + 1
            if plan.missing_count():
                (generator or generate_missing)(lab, plan, generators, captions, events=progress)
            record_pending(lab, plan, generators)  # --no-generate asks for stored ones only

        # generated resyntheses were embedded batch by batch; what is left is the query images
        # and any stored image that lacks an embedding (loaded from its blob)
        to_embed: dict[int, PIL.Image.Image | None] = {p.image_id: p.picture for p in prepared}
        for image_ids in plan.stored.values():
            for image_id in image_ids:
                to_embed.setdefault(image_id, None)
        fresh: dict[int, np.ndarray] = {}
        if progress:
            progress(ProgressEvent("embed", 0, len(to_embed)))
        embedding_of = ensure_embeddings(lab, to_embed, computed=fresh)
        if progress:
            progress(ProgressEvent("embed", len(to_embed), len(to_embed)))
    vectors = _lookup_vectors(lab, [embedding_of[i] for i in to_embed], fresh)
    image_sha = dict(plan.sha256)
    image_sha.update(
        _image_shas(lab, [i for ids in plan.stored.values() for i in ids if i not in image_sha])
    )

    # prediction sets are of resynthesis answers: a fused call neither looks one up nor notes one
    calibration = (
        calibration_sets.for_query(lab, generators, plan.wanted)
        if method == "resynthesis"
        else None
    )
    fusion = (
        fusion_for_query(lab, generators, plan.wanted, fusion_layers) if method == "fused" else None
    )
    scorer = scorer_for(lab) if fusion is not None and fusion.needs_reconstruction() else None
    reconstruction = (
        query_reconstruction(lab, generators, [(p.sha256, p.picture) for p in prepared], scorer)
        if scorer is not None
        else {}
    )
    layer_values = (
        query_layer_signals(lab, fusion, prepared, generators, plan) if fusion is not None else {}
    )
    results: list[QueryResult | QueryFailure] = []
    answers: list[_Answered] = []
    counted: set[str] = set()
    for outcome in outcomes:
        if not isinstance(outcome, _Prepared):
            results.append(outcome)
            continue
        generated = (
            0 if outcome.caption_hash in counted else generated_for.get(outcome.caption_hash, 0)
        )
        counted.add(outcome.caption_hash)
        name = image_names.get(outcome.path) if image_names else None
        result, distances = _answer(
            lab, outcome, generators, plan, embedding_of, vectors, image_sha, generated, name
        )
        if fusion is not None:
            result = apply_fusion(
                result,
                reconstruction[outcome.sha256] if scorer is not None else None,
                fusion.weights,
                scorer.unsupported if scorer is not None else None,
                layers=layer_values.get(outcome.image_id),
                origin=fusion.to_json(),
            )
        result = calibration_sets.apply(calibration, result)
        answers.append(_Answered(len(results), result, outcome.caption_hash, distances))
        results.append(result)
    for answered in _recorded(lab, answers):
        results[answered.position] = answered.result
    return results


def query_layer_signals(
    lab: Lab,
    fusion: QueryFusion,
    prepared: Sequence[_Prepared],
    generators: Sequence[GeneratorRow],
    plan: ResynthesisPlan,
) -> dict[int, dict[str, dict[str, float | None]]]:
    """query image id -> ``layer-N`` -> candidate -> layer distance (None: no resynthesis).

    Only the layers the fusion weighs are measured; the blocks' vectors of the query images and
    resyntheses are stored (``attribution.evidence.layers``), so a resynthesis is read at a block
    once.
    """
    layers = fusion.computed_layers()
    if not layers or not prepared:
        return {}
    reader = layer_reader(lab, layers)
    names = [row.name for row in generators]
    ids = [p.image_id for p in prepared]
    compared = [[plan.stored.get((p.caption_hash, n), []) for n in names] for p in prepared]
    found = layer_distances(
        lab, reader, ids, compared, pictures={p.image_id: p.picture for p in prepared}
    )
    out: dict[int, dict[str, dict[str, float | None]]] = {}
    for i, image_id in enumerate(ids):
        out[image_id] = {
            layer_signal(layer): {
                name: None if not np.isfinite(matrix[i, c]) else float(matrix[i, c])
                for c, name in enumerate(names)
            }
            for layer, matrix in found.items()
        }
    return out


#: Files a query skips without a word when they are given (``rsx query DIR/*`` sweeps them up):
#: caption sidecars (``x.txt``, ``x.png.txt``), manifests, notes. In folders only images are read.
SKIPPED_SUFFIXES = frozenset({".txt", ".json", ".csv"})


def expand_query_paths(paths: Sequence[Path]) -> list[Path | QueryFailure]:
    """The images to query: files as given, folders walked for their image files (sorted).

    Given ``.txt``/``.json``/``.csv`` files are skipped (see ``SKIPPED_SUFFIXES``); a folder
    walk follows links but enters each real directory once (``walk_files``) and keeps the files
    with an image suffix; a folder that cannot be listed, or holds no image, becomes one failure.
    """
    found: list[Path | QueryFailure] = []

    def unlistable(folder: Path, error: OSError) -> None:
        found.append(
            QueryFailure(image=str(folder), error=f"cannot list folder: {error.strerror or error}")
        )

    for given in paths:
        path = Path(given)
        if path.is_dir():
            before = len(found)
            for child in walk_files(path, on_error=unlistable):
                if child.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(child)
            if len(found) == before:  # as rsx ingest says of an empty folder
                found.append(
                    QueryFailure(image=str(path), error="no images found in this directory")
                )
        elif path.suffix.lower() not in SKIPPED_SUFFIXES:
            found.append(path)  # a file, or something missing: loading says what is wrong
    return found


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
    """The vectors of a few embeddings, gathered by id: O(k) whatever the lab's size.

    Those just computed are taken as they are; an index this process already holds in memory
    (``rsx serve``) gives those it holds; the rest are read from the database by primary key.
    The index file is never opened here: opening it reads and hashes it whole (O(N)).
    """
    found: dict[int, np.ndarray] = {i: fresh[i] for i in embedding_ids if i in fresh}
    ids = np.array(sorted(set(embedding_ids) - set(found)), dtype=np.int64)
    if not len(ids):
        return found
    index = lab.loaded_index()
    indexed = ids[ids <= index.watermark] if index is not None else ids[:0]
    if index is not None and len(indexed):
        try:
            rows = index.vectors_for(indexed)
            found.update({int(i): row for i, row in zip(indexed, rows, strict=True)})
        except MissingVectorsError:  # rows that committed late: the database has them
            pass
    rest = [int(i) for i in ids if int(i) not in found]
    if rest:
        with lab.session() as session:
            found.update(embeddings.vectors_by_embedding_id(session, rest, lab.fingerprint))
    lost = [i for i in rest if i not in found]
    if lost:
        raise StoreError(
            f"embedding(s) {', '.join(map(str, lost[:5]))} vanished from the database during"
            " the query; run 'rsx check'"
        )
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
    name: str | None = None,
) -> tuple[QueryResult, dict[str, list[float]]]:
    """The answer for one prepared image (named ``name`` in it, else by its path), and its
    distances per generator (for the audit)."""
    settings = lab.settings
    per_generator: dict[str, list[int]] = {
        row.name: plan.stored.get((query.caption_hash, row.name), []) for row in generators
    }
    query_vector = vectors[embedding_of[query.image_id]]
    distances: dict[str, list[float]] = {}
    nearest: dict[str, str] = {}
    for generator, image_ids in per_generator.items():
        resyntheses = [vectors[embedding_of[i]] for i in image_ids]
        values = resynthesis_distances(query_vector, resyntheses, settings.distance)
        distances[generator] = values
        if values:
            nearest[generator] = image_sha[image_ids[int(np.argmin(values))]]
    outcome = attribute(
        distances,
        aggregation=settings.aggregation,
        temperature=settings.temperature,
        threshold=settings.unknown_threshold,
        margin_floor=settings.margin_floor,
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
        image=name or str(query.path),
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
        verdict_reason=outcome.reason,
        tied=list(outcome.tied),
        threshold=outcome.threshold,
        margin_floor=outcome.margin_floor,
        closed_set=outcome.threshold is None,
        without_resynthesis=list(outcome.unranked),
        # same bytes, same image row (content addressing): the query is one of the resyntheses
        exact_match_of=[name for name, ids in per_generator.items() if query.image_id in ids],
        score_meaning=score_meaning(settings.temperature),
        temperature=settings.temperature,
        rsx_version=__version__,
        resyntheses_per_generator={row.name: plan.wanted[row.name] for row in generators},
        generation={
            row.name: _generation_record(lab, row, plan, query.caption_hash) for row in generators
        },
    )
    return result, distances


def _generation_record(
    lab: Lab, row: GeneratorRow, plan: ResynthesisPlan, caption_hash: str
) -> dict[str, Any]:
    """How ``row`` made the resyntheses this answer compared, enough to make them again: its
    kind and model files, its generation settings with the dtype it ran in, and the seeds.

    An imported generator runs elsewhere: the lab knows only that its images were supplied.
    """
    settings = factory.generation_settings(row.kind, row.settings_json)
    if settings is None:
        return {"kind": row.kind, "imported": True}
    missing = {seed for caption, seed in plan.missing.get(row.name, []) if caption == caption_hash}
    device = settings.run_device(lab.device)
    return {
        "kind": row.kind,
        "imported": False,
        "source": row.source,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "size": f"{settings.width}x{settings.height}",
        "scheduler": settings.scheduler,  # None: the pipeline's own
        "negative_prompt": settings.negative_prompt,
        "dtype": settings.resolved_dtype(device),
        "seeds": [seed for seed in range(plan.wanted[row.name]) if seed not in missing],
    }


@dataclass(frozen=True)
class _Answered:
    """An answer of a call on its way to the audit: where it stands among the call's results,
    its caption's hash and its distances per generator (for the audit row)."""

    position: int
    result: QueryResult
    caption_hash: str
    distances: dict[str, list[float]]


def _recorded(lab: Lab, answers: list[_Answered]) -> list[_Answered]:
    """The audit rows of a call's answers, in one transaction; the answers as recorded, each
    with its query_id (which each row's stored answer holds too)."""
    if not answers:
        return []
    recorded = []
    with lab.session() as session:
        for answered in answers:
            query_id = audit.record_query(
                session,
                answer=answered.result.to_json(),
                caption_hash=answered.caption_hash,
                distances=answered.distances,
            )
            result = dataclasses.replace(answered.result, query_id=query_id)
            recorded.append(dataclasses.replace(answered, result=result))
    return recorded


def _image_shas(lab: Lab, image_ids: list[int]) -> dict[int, str]:
    if not image_ids:
        return {}
    with lab.session() as session:
        return repository.image_sha256s(session, image_ids)
