"""The fused method's weights chosen on the lab's own references, recorded, and used by queries.

``rsx calibrate --method fused [--fusion-layers 1,2,3]`` measures every signal of the fused
method on the lab's usable references (images of known generator whose caption has resyntheses
by every candidate, ``calibrated.find_references``): the resynthesis distance, the
reconstruction distance and the ``layer-N`` distances (``pipeline.layers``). It then chooses
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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from resynth_index.errors import RsxError
from resynth_index.pipeline import calibrated
from resynth_index.pipeline.fusion_query import (
    DEFAULT_WEIGHTS,
    GRID_STEP,
    RECONSTRUCTION,
    RESYNTHESIS,
    fixed_weights,
    fusion_weight_choice,
    query_reconstruction,
    scorer_for,
)
from resynth_index.pipeline.layers import (
    layer_distances,
    layer_reader,
    layer_signal,
    signal_layer,
)
from resynth_index.pipeline.resynthesis import plan_resyntheses
from resynth_index.store import calibrations, repository
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    from resynth_index.lab import Lab

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


# ----------------------------------------------------------------------------- signals
def reference_signals(
    lab: Lab,
    found: calibrated.ReferenceSet,
    layers: Sequence[int],
    echo: Callable[[str], None] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, str], dict[str, str]]:
    """Every fused signal of the usable references: (signal -> (n, C) distances, NaN where
    missing; (n,) true columns; candidates without an autoencoder; block -> fingerprint).

    Measured as ``rsx query`` measures a query (and ``rsx eval`` a reference): the resynthesis
    distance of ``calibrated.reference_distances``, the reconstruction distance of the query's
    scorer, the ``layer-N`` distances of ``pipeline.layers``.
    """
    from resynth_index.pipeline.intake import load_stored_image

    rows = found.generators
    names = found.names
    refs = found.references
    reader = layer_reader(lab, layers) if layers else None  # a missing block: refused first
    resynthesis, labels = calibrated.reference_distances(lab, found, echo)
    signals: dict[str, np.ndarray] = {RESYNTHESIS: resynthesis}
    if echo:
        echo(f"reconstructing {len(refs)} reference(s) through the candidates' autoencoders")
    scorer = scorer_for(lab)
    with lab.session() as session:
        shas = repository.image_sha256s(session, [r.image_id for r in refs])
    recon = np.full((len(refs), len(names)), np.nan)
    batch = lab.settings.embedding_batch_size
    for start in range(0, len(refs), batch):
        chunk = refs[start : start + batch]
        pictures = [(shas[r.image_id], load_stored_image(lab, r.image_id)) for r in chunk]
        values = query_reconstruction(lab, rows, pictures, scorer)
        for offset, (sha, _picture) in enumerate(pictures):
            for c, name in enumerate(names):
                value = values[sha][name]
                recon[start + offset, c] = np.nan if value is None else value
    signals[RECONSTRUCTION] = recon
    fingerprints: dict[str, str] = {}
    if reader is not None:
        captions = list(dict.fromkeys(r.caption_hash for r in refs))
        plan = plan_resyntheses(lab, captions, rows)  # after any generation
        if echo:
            echo(f"reading references and resyntheses at layer(s) {', '.join(map(str, layers))}")
        found_layers = layer_distances(
            lab,
            reader,
            [r.image_id for r in refs],
            [[plan.stored.get((r.caption_hash, n), []) for n in names] for r in refs],
        )
        for layer, matrix in found_layers.items():
            signals[layer_signal(layer)] = matrix
        fingerprints = {str(layer): fp for layer, fp in reader.fingerprints.items()}
    return signals, labels, dict(scorer.unsupported), fingerprints


# ----------------------------------------------------------------------------- calibrating
@dataclass(frozen=True)
class FusionOutcome:
    """A saved fused calibration and what ``rsx calibrate --method fused`` reports about it."""

    id: int
    superseded: list[int]
    record: FusionRecord
    summary: dict[str, Any]


def calibrate_fusion(
    lab: Lab,
    generators: Sequence[GeneratorRow],
    *,
    layers: Sequence[int] = (),
    generate: bool = False,
    echo: Callable[[str], None] | None = None,
) -> FusionOutcome:
    """Choose the fused weights on the lab's references, measure the choice by nested
    leave-one-out, and save them.

    Every refusal (no usable reference, a block the embedder lacks) comes before anything is
    written.
    """
    from resynth_index.models.reconstruction import DEFAULT_METRIC

    layers = tuple(sorted(set(layers)))
    found = calibrated.find_references(lab, generators, generate=generate)
    if not found.references:
        why = "".join(f"; {note}" for note in found.notes)
        raise RsxError(
            "--method fused needs references of the candidates to choose its weights on, and"
            " the lab has no usable one (a usable reference is captioned and its caption has"
            f" resyntheses by every candidate): ingest some with role 'reference'{why}"
        )
    if layers:
        layer_reader(lab, layers)  # refuse a block the embedder lacks before generating
    signals, labels, unsupported, layer_fps = reference_signals(lab, found, layers, echo)
    names = sorted(signals)
    choice = fusion_weight_choice(signals, labels, fixed_weights(names, {}))
    alone = {
        name: float(np.mean(np.where(np.isfinite(m), m, np.inf).argmin(axis=1) == labels))
        for name, m in signals.items()
    }
    record = FusionRecord(
        weights=choice.weights,
        layers=layers,
        candidates=tuple(found.names),
        reference_ids=tuple(r.id for r in found.references),
        training_accuracy=choice.training_accuracy,
        nested_loo_accuracy=choice.nested_loo_accuracy,
        embedder_fingerprint=lab.fingerprint,
        layer_fingerprints=layer_fps,
        generator_fingerprints={row.name: row.fingerprint for row in found.generators},
        distance=lab.settings.distance,
        aggregation=lab.settings.aggregation,
        reconstruction_metric=DEFAULT_METRIC,
    )
    notes = list(found.notes)
    if unsupported:
        notes.append(
            f"no reconstruction by {', '.join(sorted(unsupported))} (no autoencoder): those"
            " candidates are fused on their other signals"
        )
    summary: dict[str, Any] = {
        "references": len(labels),
        "references_per_generator": found.counts(),
        "signals": names,
        "accuracy_alone": alone,
        "unsupported": dict(sorted(unsupported.items())),
        "notes": notes,
    }
    with lab.session() as session:
        new_id, superseded = calibrations.save_calibration(
            session,
            method=FUSED,
            coverage=NO_COVERAGE,
            per_generator=False,
            candidates=found.names,
            embedder_fingerprint=lab.fingerprint,
            record=record.to_dict(),
            settings={"resyntheses": dict(found.plan.wanted)},
            summary=summary,
        )
    return FusionOutcome(new_id, superseded, record, summary)


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
    from resynth_index.models.reconstruction import DEFAULT_METRIC

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
            fix = calibrated.candidates_fix(
                other.candidates, active, "rsx calibrate --method fused"
            )
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
