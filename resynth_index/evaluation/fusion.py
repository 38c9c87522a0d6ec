"""Telling look-alike generators apart in ``rsx eval``: aeroblade, fused, fused-loo, families.

Signals (each a distance per query and candidate, NaN where it does not exist):

- ``resynthesis``: the lab's own resynthesis distance (the protocol's ``distances``; a candidate
  without a resynthesis of the caption has none);
- ``reconstruction``: how much the candidate's own autoencoder changes the query
  (``attribution.evidence.reconstruction``; imported generators have none);
- ``layer-N`` (``--fusion-layers``): the resynthesis distance measured on block N of the lab's
  embedder instead of the layer the lab was made with (``attribution.evidence.layers``, shared with
  ``rsx query --method fused``: the blocks' vectors of stored images are kept under each block's
  fingerprint; post-processed queries exist only in memory and are read through the model).

Methods:

- ``aeroblade`` ranks candidates by reconstruction distance alone. Candidates without an
  autoencoder are ranked last and named in the result (``unsupported``): never guessed.
- ``fused`` z-scores the resynthesis and reconstruction signals across candidates per query and
  takes the weighted mean of the z-scores each candidate has (``attribution.combination.fuse``),
  with weights fixed in advance: ``--fusion-weights`` or, by default, equal. This is exactly what
  ``rsx query --method fused`` computes.
- ``fused-loo`` fuses every signal measured (resynthesis, reconstruction and the ``layer-N`` ones)
  with weights chosen per repeat on the training references only: every weight vector on a grid
  over the simplex (steps of ``GRID_STEP``) is scored by its accuracy on the training references,
  and the best wins; ties go to the tied vector closest (L1) to the fixed weights (equal unless
  ``--fusion-weights``), then to the first in grid order. Test queries never enter the choice;
  the weights chosen on clean references serve every post-processing. Each split records two
  figures of the training references: ``train_accuracy``, the chosen weights' accuracy on the
  references they were chosen on (in-sample: the best of the grid, optimistic), and
  ``nested_loo_accuracy``, each training reference scored with the weights the rule chooses on
  the other training references. The method's accuracy itself is measured on the test queries.

Families (``--families a+a-ft,b+b-ft1+b-ft2``) are declared explicitly: each group names
generators that look alike (a base model and its fine-tunes). Queries whose true generator has a
family member among the candidates are ``within`` families; every other query is ``across``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from resynth_index.attribution.calibration.fusion_weights import (
    GRID_STEP,
    choose_fusion_weights,
    fusion_weight_choice,
    weight_grid,
)
from resynth_index.attribution.combination import (
    RECONSTRUCTION,
    RESYNTHESIS,
    fixed_weights,
    fuse,
    rank_missing_last,
)
from resynth_index.attribution.evidence.layers import layer_distances, layer_reader, layer_signal
from resynth_index.errors import RsxError

if TYPE_CHECKING:
    import PIL.Image

    from resynth_index.evaluation.data import EvalData
    from resynth_index.lab import Lab

FUSION_METHODS = ("aeroblade", "fused", "fused-loo")
__all__ = [
    "GRID_STEP",
    "choose_fusion_weights",
    "fixed_weights",
    "fusion_weight_choice",
    "layer_signal",
    "weight_grid",
]
NO_SIGNAL_UNKNOWNNESS = 1e3  # beyond any distance: a query no candidate could reconstruct
CLEAN_KEY = "none"  # the clean condition's name (``protocol.CLEAN``, which imports this module)


# ----------------------------------------------------------------------------- families
def parse_families(text: str | None) -> tuple[tuple[str, ...], ...]:
    """``"a+a-ft,b+b-ft"`` -> (("a", "a-ft"), ("b", "b-ft")): groups by commas, members by '+'."""
    families = []
    seen: set[str] = set()
    for group in (text or "").split(","):
        members = tuple(dict.fromkeys(m.strip() for m in group.split("+") if m.strip()))
        if not group.strip():
            continue
        if len(members) < 2:
            raise RsxError(
                f"family {group.strip()!r} needs at least two generators joined by '+',"
                " e.g. --families sd15+sd15-ft,flux+flux-lora"
            )
        twice = sorted(seen.intersection(members))
        if twice:
            raise RsxError(f"generator(s) {', '.join(twice)} named in more than one family")
        seen.update(members)
        families.append(members)
    return tuple(families)


def family_index(families: Sequence[Sequence[str]], generators: Sequence[str]) -> np.ndarray:
    """Per generator (in ``generators`` order): its family's number, or -1 for none."""
    position = {g: i for i, g in enumerate(generators)}
    unknown = sorted({m for fam in families for m in fam} - set(position))
    if unknown:
        raise RsxError(
            f"--families names generator(s) not evaluated: {', '.join(unknown)}"
            f" (evaluated: {', '.join(generators)})"
        )
    out = np.full(len(generators), -1, dtype=int)
    for number, fam in enumerate(families):
        for member in fam:
            out[position[member]] = number
    return out


def family_breakdown(
    labels: np.ndarray, predicted: np.ndarray, family_of: np.ndarray, known: np.ndarray
) -> dict[str, Any]:
    """Accuracy within families, across them, and at the family level, for one split.

    ``labels`` and ``predicted`` are generator indices (into ``family_of``) of the known test
    queries. A query is *within* when its generator's family has another member among ``known``
    candidates; *across* otherwise. ``family`` counts a prediction right when it names the true
    generator or one of its family. NaN where a group is empty.
    """
    members = {f: [int(c) for c in known if family_of[c] == f] for f in set(family_of[known])}
    within = np.array(
        [family_of[c] >= 0 and len(members.get(family_of[c], [])) > 1 for c in labels], dtype=bool
    )
    right = predicted == labels
    same_family = right | ((family_of[predicted] == family_of[labels]) & (family_of[labels] >= 0))

    def share(mask: np.ndarray, hits: np.ndarray) -> float:
        return float(hits[mask].mean()) if mask.any() else float("nan")

    return {
        "within": share(within, right),
        "across": share(~within, right),
        "family": share(np.ones_like(within), same_family),
        "within_queries": int(within.sum()),
        "across_queries": int((~within).sum()),
    }


# ----------------------------------------------------------------------------- signals
@dataclass
class FusionSignals:
    """The extra signals of an evaluation: per condition, signal -> (n queries, n generators)
    distances (NaN where missing). The resynthesis signal comes from the protocol itself."""

    values: dict[str, dict[str, np.ndarray]]
    unsupported: dict[str, str] = field(default_factory=dict)  # generator -> why no autoencoder
    metric: str = ""
    reconstructions: int = 0  # reconstructions computed

    def names(self) -> list[str]:
        first = next(iter(self.values.values()), {})
        return [RESYNTHESIS, *sorted(first)]


def load_fusion_signals(
    lab: Lab,
    data: EvalData,
    ops: Sequence[str],
    seed: int,
    *,
    metric: str,
    layers: Sequence[int] = (),
    echo: Callable[[str], None] | None = None,
) -> FusionSignals:
    """Reconstruction distances (and layer distances) of every query, clean and post-processed.

    Post-processing draws the same parameters per image as ``perturbed_features`` (the same
    ``image_rng``), so each condition's signals describe the same images as its embeddings.
    """
    from resynth_index.attribution.evidence.reconstruction import ReconstructionScorer
    from resynth_index.evaluation.perturb import apply, image_rng
    from resynth_index.store import repository

    rows = {row.name: row for row in lab.generators()}
    models = [lab.generator_model(rows[name]) for name in data.generators]
    embedder = lab.embedder if metric == "embedder" else None
    scorer = ReconstructionScorer(
        metric=metric,
        embed=(lambda images: embedder.embed(images)) if embedder is not None else None,
        embedder_fingerprint=lab.fingerprint if embedder is not None else None,
        device=lab.device,
    )
    for model in models:
        scorer.supports(model)
    if echo:
        supported = len(models) - len(scorer.unsupported)
        echo(
            f"reconstructing {len(data.image_ids)} queries through {supported} autoencoder(s)"
            + (f" with {len(ops)} post-processing(s)" if ops else "")
        )
    with lab.session() as session:
        shas = repository.image_sha256s(session, [int(i) for i in data.image_ids])
    reader = layer_reader(lab, layers) if layers else None
    if reader is not None and not data.resynthesis_ids:
        raise RsxError("layer signals need the resyntheses' image ids (load_eval_data gives them)")
    conditions = [CLEAN_KEY, *ops]
    recon: dict[str, list[np.ndarray]] = {c: [] for c in conditions}
    layer_queries: dict[str, list[dict[int, np.ndarray]]] = {c: [] for c in ops}
    batch = lab.settings.embedding_batch_size
    for start in range(0, len(data.image_ids), batch):
        keys = [int(i) for i in data.image_ids[start : start + batch]]
        originals = [lab.stored_image(key) for key in keys]
        for cond in conditions:
            if cond == CLEAN_KEY:
                pictures = originals
                named = [(shas[key], p) for key, p in zip(keys, pictures, strict=True)]
            else:
                pictures = [
                    apply(cond, picture, image_rng(seed, cond, key))[0]
                    for key, picture in zip(keys, originals, strict=True)
                ]
                named = [(_pixel_digest(p), p) for p in pictures]
            recon[cond].append(scorer.distances(models, named))
            if reader is not None and cond != CLEAN_KEY:  # in memory only: read here
                layer_queries[cond].append(reader.embed(pictures, batch_size=batch))
    values = {cond: {RECONSTRUCTION: np.concatenate(recon[cond])} for cond in conditions}
    if reader is not None:
        if echo:
            echo(f"reading the resyntheses at layer(s) {', '.join(map(str, reader.layers))}")
        ids = [int(i) for i in data.image_ids]
        # clean queries and resyntheses are stored images: their block vectors are kept
        for cond in conditions:
            given = None
            if cond != CLEAN_KEY:
                given = {
                    layer: np.concatenate([part[layer] for part in layer_queries[cond]])
                    for layer in reader.layers
                }
            found = layer_distances(lab, reader, ids, data.resynthesis_ids, query_vectors=given)
            for layer in reader.layers:
                values[cond][layer_signal(layer)] = found[layer]
    return FusionSignals(
        values=values,
        unsupported=dict(scorer.unsupported),
        metric=metric,
        reconstructions=scorer.computed,
    )


def _pixel_digest(picture: PIL.Image.Image) -> str:
    """A content key for an image that exists only in memory (a post-processed query)."""
    digest = hashlib.sha256(f"{picture.mode}:{picture.width}x{picture.height}:".encode())
    digest.update(picture.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- scoring
@dataclass
class FusionOutcome:
    """One fusion method's answers under one condition (the protocol wraps it)."""

    scores: np.ndarray  # (n test, K known) higher = more likely
    unknownness: np.ndarray  # (n test,)
    extra: dict[str, Any]


def score_fusion_split(
    method: str,
    signals: FusionSignals,
    distances: Mapping[str, np.ndarray],
    missing: np.ndarray,
    y_train: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    known: np.ndarray,
    generators: Sequence[str],
    given_weights: Mapping[str, float],
) -> dict[str, FusionOutcome]:
    """``aeroblade``, ``fused`` or ``fused-loo`` on one split, for every condition.

    ``distances``: condition -> (n, C) resynthesis distances; ``missing``: (n, C) True where the
    query's caption has no resynthesis by that generator (its resynthesis signal is missing).
    """
    out: dict[str, FusionOutcome] = {}
    unsupported = sorted(
        g for i, g in enumerate(generators) if g in signals.unsupported and i in known
    )
    if method == "aeroblade":
        for cond, values in signals.values.items():
            d = values[RECONSTRUCTION][test][:, known]
            scores = rank_missing_last(-d)
            best = np.where(np.isfinite(d), d, np.inf).min(axis=1)
            # no reconstruction for any candidate: as unknown as a query can be
            unknownness = np.where(np.isfinite(best), best, NO_SIGNAL_UNKNOWNNESS)
            out[cond] = FusionOutcome(scores, unknownness, {"unsupported": unsupported})
        return out

    def signal_arrays(cond: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        arrays = {RESYNTHESIS: np.where(missing, np.nan, distances[cond])[rows][:, known]}
        for name, values in signals.values[cond].items():
            if name in names:
                arrays[name] = values[rows][:, known]
        return arrays

    fixed_weights(signals.names(), given_weights)  # refuses weights of signals not measured
    names = [RESYNTHESIS, RECONSTRUCTION] if method == "fused" else signals.names()
    weights = fixed_weights(names, {k: v for k, v in given_weights.items() if k in names})
    extra: dict[str, Any] = {"unsupported": unsupported}
    if method == "fused-loo":
        choice = fusion_weight_choice(signal_arrays(CLEAN_KEY, train), y_train, weights)
        weights = choice.weights
        extra["train_accuracy"] = choice.training_accuracy  # in-sample
        extra["nested_loo_accuracy"] = choice.nested_loo_accuracy
    elif method != "fused":
        raise ValueError(f"not a fusion method: {method!r}")
    extra["fusion_weights"] = dict(weights)
    for cond in signals.values:
        scores, _covered = fuse(signal_arrays(cond, test), weights)
        out[cond] = FusionOutcome(scores, -scores.max(axis=1), dict(extra))
    return out
