"""The labelled data an evaluation runs on, read from a lab.

Each reference (an image whose generator is known, with a caption) is a query; the resyntheses of
its caption by every candidate are its comparison set, chosen exactly as ``rsx query`` chooses
them (``plan_resyntheses``: K seeds per runnable generator, the first K supplied images of an
imported one). Features are the lab's embeddings, computed where missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from resynth_index.attribution.evidence.resynthesis import distance_matrix
from resynth_index.errors import RsxError
from resynth_index.pipeline.intake import ensure_embeddings
from resynth_index.pipeline.plans import plan_resyntheses
from resynth_index.pipeline.resynthesis import generate_missing
from resynth_index.store import embeddings, repository

if TYPE_CHECKING:
    from resynth_index.lab import Lab

#: Distance given to a candidate without any resynthesis of a caption (beyond any real distance).
MISSING_DISTANCE = 10.0


@dataclass
class EvalData:
    generators: list[str]  # the classes, sorted by name (the candidate order)
    image_ids: np.ndarray  # per query (reference)
    labels: np.ndarray  # per query: index into generators
    captions: list[str]  # per query: caption hash
    features: np.ndarray  # (n, d) the queries' clean embeddings
    resyntheses: list[list[np.ndarray]]  # per query, per generator: (K, d) embeddings
    distance: str
    aggregation: str
    temperature: float
    notes: list[str] = field(default_factory=list)
    #: per query, per generator: the image ids behind ``resyntheses`` (empty when not known)
    resynthesis_ids: list[list[list[int]]] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return len(self.generators)

    def counts(self) -> dict[str, int]:
        return {g: int(np.sum(self.labels == i)) for i, g in enumerate(self.generators)}

    def resynthesis_distances(self, queries: np.ndarray) -> np.ndarray:
        """(n, C) aggregated distance of each query to each candidate's resyntheses."""
        return distance_matrix(
            queries, self.resyntheses, self.distance, self.aggregation, MISSING_DISTANCE
        )


def load_eval_data(
    lab: Lab,
    generators: Sequence[str] | None = None,
    resyntheses: int | None = None,
    generate: bool = False,
    echo: Callable[[str], None] | None = None,
) -> EvalData:
    """Every reference of the chosen generators with a caption, and its caption's resyntheses."""
    active = {row.name: row for row in lab.generators()}
    if generators:
        unknown = [g for g in generators if g not in active]
        if unknown:
            raise RsxError(
                f"unknown or retired generator(s): {', '.join(unknown)}; see 'rsx generator list'"
            )
        active = {g: active[g] for g in sorted(set(generators))}
    by_id = {row.id: row for row in active.values()}
    notes: list[str] = []
    with lab.session() as session:
        refs = repository.references_of(session, list(by_id))
        caption_texts = repository.caption_texts(
            session, [r.caption_hash for r in refs if r.caption_hash is not None]
        )
    without_caption = sum(1 for r in refs if r.caption_hash is None)
    if without_caption:
        notes.append(f"{without_caption} reference(s) without a caption left out")
    # each captioned reference with its caption hash (typed ``str``, no longer ``str | None``)
    captioned = [(r, r.caption_hash) for r in refs if r.caption_hash is not None]
    refs = [r for r, _ in captioned]
    names = sorted({by_id[r.generator_id].name for r in refs})
    if len(names) < 2:
        raise RsxError(
            "evaluation needs captioned references of at least two generators; ingest some"
            " (e.g. 'rsx ingest DATASET --layout resynthesis-dataset')"
        )
    skipped = sorted(set(active) - set(names))
    if skipped:
        notes.append(f"generators without references left out: {', '.join(skipped)}")
    rows = [active[n] for n in names]
    captions = list(dict.fromkeys(caption for _, caption in captioned))
    plan = plan_resyntheses(lab, captions, rows, resyntheses)
    if generate and plan.missing_count():
        if echo:
            echo(f"generating {plan.missing_count()} missing resynthes(es)")
        generate_missing(lab, plan, rows, {c: caption_texts[c] for c in captions})
    missing = sum(1 for c in captions for n in names if not plan.stored.get((c, n)))
    if missing:
        notes.append(
            f"{missing} (caption, generator) pair(s) lack a resynthesis; those candidates rank"
            " last for that query" + ("" if generate else " (--generate makes runnable ones)")
        )
    ids = [r.image_id for r in refs] + [i for ids in plan.stored.values() for i in ids]
    if echo:
        echo(f"embedding what is missing among {len(set(ids))} image(s)")
    ensure_embeddings(lab, dict.fromkeys(ids))
    vectors = _vectors(lab, ids)
    index = {n: i for i, n in enumerate(names)}
    return EvalData(
        generators=names,
        image_ids=np.array([r.image_id for r in refs], dtype=np.int64),
        labels=np.array([index[by_id[r.generator_id].name] for r in refs], dtype=int),
        captions=[caption for _, caption in captioned],
        features=np.stack([vectors[r.image_id] for r in refs]),
        resyntheses=[
            [
                np.stack([vectors[i] for i in plan.stored.get((caption, n), [])])
                if plan.stored.get((caption, n))
                else np.zeros((0, lab.settings.embedder_dim), dtype=np.float32)
                for n in names
            ]
            for _, caption in captioned
        ],
        distance=lab.settings.distance,
        aggregation=lab.settings.aggregation,
        temperature=lab.settings.temperature,
        notes=notes,
        resynthesis_ids=[
            [list(plan.stored.get((caption, n), [])) for n in names] for _, caption in captioned
        ],
    )


def _vectors(lab: Lab, image_ids: Sequence[int]) -> dict[int, np.ndarray]:
    with lab.session() as session:
        return embeddings.vectors_by_image_id(session, image_ids, lab.fingerprint)


def perturbed_features(
    lab: Lab, image_ids: Sequence[int] | np.ndarray, ops: Sequence[str], seed: int
) -> dict[str, np.ndarray]:
    """op -> (n, d) embeddings of the post-processed images (parameters drawn per image)."""
    from resynth_index.evaluation.perturb import apply, image_rng

    batch = lab.settings.embedding_batch_size
    parts: dict[str, list[np.ndarray]] = {op: [] for op in ops}
    for start in range(0, len(image_ids), batch):  # a batch at a time: big images, many ops
        keys = [int(i) for i in image_ids[start : start + batch]]
        originals = [lab.stored_image(key) for key in keys]
        for op in ops:
            changed = [
                apply(op, picture, image_rng(seed, op, key))[0]
                for key, picture in zip(keys, originals, strict=True)
            ]
            parts[op].append(lab.embedder.embed(changed, batch_size=batch))
    return {op: np.concatenate(chunks) for op, chunks in parts.items()}
