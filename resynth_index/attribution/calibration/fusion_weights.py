"""The fused method's weights chosen on the lab's own references, recorded, and used by queries.

``rsx calibrate --method fused [--fusion-layers 1,2,3]`` measures every signal of the fused
method on the lab's usable references (images of known generator whose caption has resyntheses
by every candidate, ``pipeline.references.find_references``): the resynthesis distance, the
reconstruction distance and the ``layer-N`` distances (``evidence.layers``). It then chooses
the weights exactly as ``rsx eval``'s ``fused-loo`` does on its training references
(``fusion_query.fusion_weight_choice``: the best accuracy on the references over a 0.1-step
grid, ties to equal weights) and saves them in the calibrations table (method ``fused``) with
the layers, the references used, two accuracies and every fingerprint and setting the signals
depend on. The accuracies: the nested leave-one-out one (each reference scored with the weights
the rule chooses on the others: the honest estimate) and the training one (the chosen weights on
the references they were chosen on: in-sample, optimistic). Calibrations saved before the nested
figure existed hold only the in-sample one, under ``loo_accuracy``: it is read as the training
accuracy. Only references are read: no query, and nothing of the query history, enters the
choice.

``rsx query --method fused`` then uses the newest active fused calibration of exactly its
candidate set when it applies (same embedder, candidates' fingerprints, distance, aggregation,
resyntheses per generator, reconstruction metric, and the same layers when ``--fusion-layers``
is given); otherwise the fixed equal weights, over resynthesis, reconstruction and the layers
asked for. Each answer says which (``fusion``: ``source``, ``calibration``, ``note``). A query
never chooses weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from resynth_index.attribution.calibration import sets
from resynth_index.attribution.combination import (
    DEFAULT_WEIGHTS,
    RECONSTRUCTION,
    RESYNTHESIS,
    nan_zscore_rows,
    rank_missing_last,
)
from resynth_index.attribution.evidence.layers import layer_signal, signal_layer
from resynth_index.errors import RsxError
from resynth_index.store import calibrations
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    from resynth_index.lab import Lab


GRID_STEP = 0.1
FUSED = "fused"


FIXED = "fixed"


RECORDED = "recorded"


#: A fused calibration has no coverage; its row stores this in the coverage column.
NO_COVERAGE = 0.0


# ----------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class FusionRecord:
    """What a fused calibration holds (its ``record_json``)."""

    weights: dict[str, float]  # signal -> weight (sum 1)
    layers: tuple[int, ...]
    candidates: tuple[str, ...]  # sorted
    reference_ids: tuple[int, ...]
    training_accuracy: float  # in-sample: on the references the weights were chosen on
    nested_loo_accuracy: float | None  # each reference held out of the choice; None: not measured
    embedder_fingerprint: str
    layer_fingerprints: dict[str, str]  # "N" -> the block's embedder fingerprint
    generator_fingerprints: dict[str, str]
    distance: str
    aggregation: str
    reconstruction_metric: str
    grid_step: float = GRID_STEP

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "fusion",
            "weights": dict(self.weights),
            "layers": list(self.layers),
            "candidates": list(self.candidates),
            "reference_ids": list(self.reference_ids),
            "training_accuracy": self.training_accuracy,
            "nested_loo_accuracy": self.nested_loo_accuracy,
            "embedder_fingerprint": self.embedder_fingerprint,
            "layer_fingerprints": dict(self.layer_fingerprints),
            "generator_fingerprints": dict(self.generator_fingerprints),
            "distance": self.distance,
            "aggregation": self.aggregation,
            "reconstruction_metric": self.reconstruction_metric,
            "grid_step": self.grid_step,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusionRecord:
        """The record saved by ``to_dict``, or by an older version: those hold only the
        in-sample accuracy, under the name ``loo_accuracy``; it is read as what it is, the
        training accuracy, and the nested one as not measured (None)."""
        if data.get("kind") != "fusion":
            raise RsxError("not a fused calibration record")
        nested = data.get("nested_loo_accuracy")
        return cls(
            weights={str(k): float(v) for k, v in data["weights"].items()},
            layers=tuple(int(n) for n in data["layers"]),
            candidates=tuple(data["candidates"]),
            reference_ids=tuple(int(i) for i in data["reference_ids"]),
            training_accuracy=float(data.get("training_accuracy", data.get("loo_accuracy"))),
            nested_loo_accuracy=None if nested is None else float(nested),
            embedder_fingerprint=str(data["embedder_fingerprint"]),
            layer_fingerprints={str(k): str(v) for k, v in data["layer_fingerprints"].items()},
            generator_fingerprints=dict(data["generator_fingerprints"]),
            distance=str(data["distance"]),
            aggregation=str(data["aggregation"]),
            reconstruction_metric=str(data["reconstruction_metric"]),
            grid_step=float(data.get("grid_step", GRID_STEP)),
        )


# ----------------------------------------------------------------------------- using one
@dataclass(frozen=True)
class QueryFusion:
    """The fusion a ``run_queries`` call applies: its weights and layers, and where they come
    from (``FIXED``, or ``RECORDED`` with the calibration's id, time, references and accuracies:
    nested leave-one-out, None for a calibration saved before it was measured, and training)."""

    weights: dict[str, float]
    layers: tuple[int, ...]
    source: str
    calibration_id: int | None = None
    created_at: str | None = None
    references: int = 0
    nested_loo_accuracy: float | None = None
    training_accuracy: float | None = None  # in-sample
    note: str | None = None  # why the lab's fused calibration is not used

    def computed_layers(self) -> tuple[int, ...]:
        """The layers a query must measure: those with a positive weight."""
        return tuple(n for n in self.layers if self.weights.get(layer_signal(n), 0.0) > 0)

    def needs_reconstruction(self) -> bool:
        return self.weights.get(RECONSTRUCTION, 0.0) > 0

    def to_json(self) -> dict[str, Any]:
        """What an answer's ``fusion`` records of it."""
        calibration = None
        if self.source == RECORDED:
            calibration = {
                "id": self.calibration_id,
                "created_at": self.created_at,
                "references": self.references,
                "nested_loo_accuracy": self.nested_loo_accuracy,
                "training_accuracy": self.training_accuracy,
            }
        return {
            "layers": list(self.layers),
            "source": self.source,
            "calibration": calibration,
            "note": self.note,
        }


def fixed_fusion(layers: Sequence[int] = (), note: str | None = None) -> QueryFusion:
    """Equal fixed weights over resynthesis, reconstruction and the ``layers``."""
    layers = tuple(sorted(set(layers)))
    weights = dict(DEFAULT_WEIGHTS)
    weights.update({layer_signal(n): 1.0 for n in layers})
    return QueryFusion(weights=weights, layers=layers, source=FIXED, note=note)


def fusion_for_query(
    lab: Lab,
    generators: Sequence[GeneratorRow],
    resyntheses: Mapping[str, int],
    layers: Sequence[int] | None = None,
) -> QueryFusion:
    """The recorded fusion of exactly these candidates when it applies, else the fixed one.

    ``layers``: the blocks asked for (None: whatever the recorded fusion uses, none without
    one). A recorded fusion applies when it was made with this embedder, these candidates'
    fingerprints, the lab's distance and aggregation, the same resyntheses per generator, the
    default reconstruction metric, and (when given) these layers.
    """
    from resynth_index.attribution.evidence.reconstruction import DEFAULT_METRIC

    asked = None if layers is None else tuple(sorted(set(layers)))
    names = [row.name for row in generators]
    with lab.session() as session:  # this set's, else the newest of any set
        stored = calibrations.calibration_for(session, names, FUSED)
    other = None
    if stored is not None and set(stored.candidates) != set(names):
        stored, other = None, stored
    if stored is None:
        note = None
        if other is not None:
            active = {row.name for row in lab.generators()}
            fix = sets.candidates_fix(other.candidates, active, "rsx calibrate --method fused")
            note = (
                f"fused calibration #{other.id} not used: it was made for the candidates"
                f" {', '.join(other.candidates)}, not {', '.join(sorted(names))}; {fix}"
            )
        return fixed_fusion(asked or (), note)
    try:
        record = FusionRecord.from_dict(stored.record)
    except (RsxError, KeyError, TypeError, ValueError) as error:
        return fixed_fusion(asked or (), f"fused calibration #{stored.id} not used: {error}")
    reason = None
    changed = sorted(
        row.name
        for row in generators
        if record.generator_fingerprints.get(row.name) != row.fingerprint
    )
    calibrated_k = stored.settings.get("resyntheses") or {}
    other_k = sorted(g for g in resyntheses if calibrated_k.get(g) != resyntheses[g])
    if record.embedder_fingerprint != lab.fingerprint:
        reason = "made with another embedder"
    elif changed:
        reason = f"made with other models of {', '.join(changed)}"
    elif (record.distance, record.aggregation) != (
        lab.settings.distance,
        lab.settings.aggregation,
    ):
        reason = f"made with {record.distance} distance and {record.aggregation} aggregation"
    elif other_k:
        reason = f"made with other resyntheses per caption for {', '.join(other_k)}"
    elif record.reconstruction_metric != DEFAULT_METRIC:
        reason = f"made with the {record.reconstruction_metric} reconstruction metric"
    elif asked is not None and asked != record.layers:
        shown = ",".join(map(str, record.layers)) or "none"
        reason = f"made with layers {shown}, not the {','.join(map(str, asked)) or 'none'} asked"
    if reason is not None:
        return fixed_fusion(asked or (), f"fused calibration #{stored.id} not used: {reason}")
    unknown = [s for s in record.weights if s not in (RESYNTHESIS, RECONSTRUCTION)]
    if any(signal_layer(s) not in record.layers for s in unknown):
        return fixed_fusion(
            asked or (), f"fused calibration #{stored.id} not used: unknown signals {unknown}"
        )
    return QueryFusion(
        weights=dict(record.weights),
        layers=record.layers,
        source=RECORDED,
        calibration_id=stored.id,
        created_at=stored.created_at.isoformat(),
        references=len(record.reference_ids),
        nested_loo_accuracy=record.nested_loo_accuracy,
        training_accuracy=record.training_accuracy,
    )


#: Step of the weight grid ``choose_fusion_weights`` searches.


# ----------------------------------------------------------------------------- weights
def weight_grid(names: Sequence[str], step: float = GRID_STEP) -> list[dict[str, float]]:
    """Every weight vector over ``names`` with entries on multiples of ``step`` summing to 1."""
    parts = round(1 / step)
    grid = []
    for combo in itertools.product(range(parts + 1), repeat=len(names)):
        if sum(combo) == parts:
            grid.append({n: round(c / parts, 10) for n, c in zip(names, combo, strict=True)})
    return grid


def _normalised(weights: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    vector = np.array([float(weights.get(n, 0.0)) for n in names])
    total = vector.sum()
    return vector / total if total > 0 else np.full(len(names), 1.0 / len(names))


#: Scores held at once while the grid is searched (grid vectors x references x candidates), so
#: the memory stays near 8 MB a working array whatever the number of references.
_GRID_CHUNK_VALUES = 1_000_000


@dataclass(frozen=True)
class WeightChoice:
    """Fusion weights chosen on references of known generator, and how well the choice does.

    ``training_accuracy`` is in-sample: the chosen weights' accuracy on the very references they
    were chosen on, the best of every vector on the grid, so it flatters (on pure noise it sits
    well above chance). ``nested_loo_accuracy`` is the honest figure: each reference is scored
    with the weights the same rule chooses on all the other references, and the hits averaged.
    Both are NaN without references.
    """

    weights: dict[str, float]
    training_accuracy: float
    nested_loo_accuracy: float
    grid_size: int  # weight vectors searched


def fusion_weight_choice(
    train: Mapping[str, np.ndarray],
    y_train: np.ndarray,
    prior: Mapping[str, float],
    step: float = GRID_STEP,
) -> WeightChoice:
    """The grid weights with the best accuracy on the references, and the rule's nested
    leave-one-out accuracy.

    The rule: every weight vector on a grid over the simplex (steps of ``step``) is scored by
    its top-1 accuracy on the references; the best wins; ties go to the tied vector closest (L1)
    to ``prior``, then to the first in grid order. ``train``: signal -> (m, K) distances of the
    references over the candidates (NaN: missing); ``y_train``: their generators (column
    indices). Only these references are seen.

    No signal is fitted and each reference is z-scored across its own candidates, so whether a
    grid vector ranks a reference right does not depend on the other references. The (grid,
    references) table of hits is therefore computed once, and the nested leave-one-out only
    repeats the choice: leaving reference i out subtracts its column from the counts. The cost
    is that of the choice alone, O(grid x m x K x signals), not m times it.
    """
    names = sorted(train)
    grid = weight_grid(names, step)
    matrix = np.array([[w[n] for n in names] for w in grid], dtype=np.float64)
    y = np.asarray(y_train)
    hits = _grid_hits([np.asarray(train[n], dtype=np.float64) for n in names], matrix, y)
    ranked = _tie_break_order(matrix, _normalised(prior, names))
    hits = hits[ranked]  # best tie-break first: np.argmax keeps the first of tied counts
    counts = hits.sum(axis=1)
    best = grid[int(ranked[int(np.argmax(counts))])]
    if not y.size:
        return WeightChoice(best, float("nan"), float("nan"), len(grid))
    # reference i left out: every vector's count on the others, the rule's pick, its hit on i
    picked = np.argmax(counts[:, None] - hits, axis=0)
    nested = hits[picked, np.arange(y.size)]
    return WeightChoice(best, float(counts.max() / y.size), float(nested.mean()), len(grid))


def _grid_hits(signals: Sequence[np.ndarray], matrix: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(grid vectors, references): True where the vector's fused score ranks ``y`` first.

    ``signals``: (m, K) distances per column of ``matrix`` (the grid, one vector a row). The
    arithmetic is ``fuse``'s, term by term in the same order, vectorised over the grid in
    chunks of ``_GRID_CHUNK_VALUES`` scores.
    """
    z = [nan_zscore_rows(-values) for values in signals]
    present = [np.isfinite(values) for values in z]
    filled = [np.where(p, values, 0.0) for p, values in zip(present, z, strict=True)]
    m, k = filled[0].shape
    hits = np.zeros((len(matrix), m), dtype=bool)
    if not m or not k:
        return hits
    chunk = max(1, _GRID_CHUNK_VALUES // (m * k))
    for start in range(0, len(matrix), chunk):
        w = matrix[start : start + chunk, :, None, None]  # (g, signals, 1, 1)
        total = sum(w[:, s] * filled[s] for s in range(len(filled)))
        mass = sum(w[:, s] * present[s] for s in range(len(present)))
        fused = np.where(mass > 0, total / np.where(mass > 0, mass, 1), np.nan)
        scores = rank_missing_last(fused.reshape(-1, k)).reshape(fused.shape)
        hits[start : start + chunk] = scores.argmax(axis=2) == y
    return hits


def _tie_break_order(matrix: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The grid's row numbers, closest (L1, to 1e-9) to ``prior`` first, then in grid order."""
    normalised = matrix / matrix.sum(axis=1, keepdims=True)  # every grid row sums to 1 > 0
    closeness = np.array([round(float(d), 9) for d in np.abs(normalised - prior).sum(axis=1)])
    return np.lexsort((np.arange(len(matrix)), closeness))


def choose_fusion_weights(
    train: Mapping[str, np.ndarray],
    y_train: np.ndarray,
    prior: Mapping[str, float],
    step: float = GRID_STEP,
) -> tuple[dict[str, float], float]:
    """(weights, training accuracy) of ``fusion_weight_choice``: the accuracy is in-sample,
    measured on the references the weights were chosen on (optimistic; the rule's honest figure
    is ``fusion_weight_choice(...).nested_loo_accuracy``)."""
    choice = fusion_weight_choice(train, y_train, prior, step)
    return choice.weights, choice.training_accuracy
