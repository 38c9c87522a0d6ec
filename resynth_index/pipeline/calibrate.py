"""Making a lab's calibrations (``rsx calibrate``): prediction sets of resynthesis answers, and
the fused method's weights, both on the lab's own references of known generator.

Prediction sets: every usable reference (``pipeline/references.py``) is scored exactly as
``rsx query`` scores a query (the caption's stored resyntheses by every candidate, K per runnable
generator, the lab's distance and aggregation); the softmax temperature is fitted on them and
the conformal threshold(s) computed (``attribution/calibration/conformal.py``); the calibration
is saved in the lab (``store/calibrations.py``), and queries use it
(``attribution/calibration/sets.py``). The fused weights: see
``attribution/calibration/fusion_weights.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from resynth_index.attribution.calibration import conformal
from resynth_index.attribution.calibration.fusion_weights import (
    FUSED,
    NO_COVERAGE,
    FusionRecord,
    fusion_weight_choice,
)
from resynth_index.attribution.calibration.sets import check_method
from resynth_index.attribution.combination import fixed_weights
from resynth_index.attribution.evidence.layers import layer_reader
from resynth_index.errors import RsxError
from resynth_index.pipeline.references import (
    check_enough,
    find_references,
    prepare_references,
    reference_distances,
    reference_signals,
)
from resynth_index.store import calibrations

if TYPE_CHECKING:
    from resynth_index.lab import Lab
    from resynth_index.pipeline.plans import PlannedGenerations, ProgressCallback
    from resynth_index.store.models import GeneratorRow


@dataclass(frozen=True)
class CalibrationOutcome:
    """A saved calibration and what ``rsx calibrate`` reports about it."""

    id: int
    superseded: list[int]
    calibration: conformal.Calibration
    summary: dict[str, Any]


def calibrate_lab(
    lab: Lab,
    generators: Sequence[GeneratorRow],
    *,
    method: str = conformal.METHOD,
    coverage: float = 0.95,
    per_generator: bool = False,
    generate: bool = True,
    echo: Callable[[str], None] | None = None,
    on_plan: Callable[[PlannedGenerations], None] | None = None,
    events: ProgressCallback | None = None,
) -> CalibrationOutcome:
    """Calibrate prediction sets for this candidate set on the lab's references, and save it.

    The runnable candidates' missing resyntheses are made first (``generate``, as ``rsx query``
    makes them: ``on_plan`` and ``events`` as ``prepare_references`` takes them). Every refusal
    (method, coverage, too few references) comes before any resynthesis or calibration is
    written, but for the imported candidates' work orders, which the last one points at (and
    the rare one after generating: a fresh resynthesis that is a reference's own image).
    """
    check_method(method)
    if method != conformal.METHOD:
        raise RsxError(f"--method {method} is calibrated by calibrate_fusion")
    conformal.references_needed(coverage)  # validates the coverage
    found = prepare_references(
        lab,
        generators,
        generate=generate,
        check=lambda references: check_enough(references, coverage, per_generator),
        on_plan=on_plan,
        events=events,
        echo=echo,
    )
    distances, labels = reference_distances(lab, found, echo)
    names = found.names
    result = conformal.calibrate(
        distances,
        labels,
        names,
        coverage=coverage,
        per_generator=per_generator,
        reference_ids=[r.id for r in found.references],
        embedder_fingerprint=lab.fingerprint,
        generator_fingerprints={row.name: row.fingerprint for row in found.generators},
        distance=lab.settings.distance,
        aggregation=lab.settings.aggregation,
    )
    fixed = lab.settings.temperature
    notes = list(found.notes)
    low, high = conformal.TEMPERATURE_BOUNDS
    if result.temperature <= low * 1.01:
        notes.append(
            "the fitted temperature is at its lower bound: every reference's own generator was"
            " closest by a wide margin, so calibrated scores come out near 0 or 1"
        )
    elif result.temperature >= high / 1.01:
        notes.append(
            "the fitted temperature is at its upper bound: the distances hardly tell the"
            " candidates apart on these references, so sets will name most of them"
        )
    summary: dict[str, Any] = {
        "references": len(labels),
        "references_per_generator": dict(result.references_per_generator),
        "fixed_temperature": fixed,
        "ece_fixed": conformal.expected_calibration_error(
            conformal.softmax_probabilities(distances, fixed), labels
        ),
        "ece_fitted": conformal.expected_calibration_error(
            conformal.softmax_probabilities(distances, result.temperature), labels
        ),
        "accuracy": float(np.mean(distances.argmin(axis=1) == labels)),
        "notes": notes,
    }
    with lab.session() as session:
        new_id, superseded = calibrations.save_calibration(
            session,
            method=result.method,
            coverage=result.coverage,
            per_generator=result.per_generator,
            candidates=names,
            embedder_fingerprint=result.embedder_fingerprint,
            record=result.to_dict(),
            settings={"resyntheses": dict(found.plan.wanted)},
            summary=summary,
        )
    return CalibrationOutcome(id=new_id, superseded=superseded, calibration=result, summary=summary)


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
    from resynth_index.attribution.evidence.reconstruction import DEFAULT_METRIC

    layers = tuple(sorted(set(layers)))
    found = find_references(lab, generators, generate=generate)
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
