"""How well conformal prediction sets keep their promise on the lab's references.

Over many random calibration/test splits of the references (seeded), the resynthesis distances
of the calibration part set the thresholds (``attribution.calibration.conformal``: a
temperature fitted on them, then one threshold, or one per generator) and the test part
measures what a user would see: empirical coverage (the share of test queries whose set holds
their true generator), mean set size, the shares of singleton and empty sets, and the top-1
accuracy next to them. Coverage is
averaged over splits because one calibration's coverage is itself random around the guarantee.

Splits are stratified: every generator gives the same share of its references to calibration,
so every split has the per-generator counts that Mondrian calibration needs (and that the
refusal checks up front). Calibration always uses clean references; post-processed test
queries are no longer exchangeable with them, so the guarantee does not hold there and the
report shows the drop.

It also measures the expected calibration error (ECE) of the ``score`` that ``rsx query`` shows:
softmax(-d / T) at the lab's fixed temperature against the temperature fitted on the
calibration part of each split, both measured on the test part. The ECE pools the test answers
of every split (each scored with a temperature fitted without it): one split's test part is too
small for a 10-bin ECE, whose estimate is biased upwards by each bin's sampling noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from resynth_index.attribution.calibration import conformal
from resynth_index.errors import RsxError
from resynth_index.evaluation.metrics import mean_std

DEFAULT_SPLITS = 100
DEFAULT_CALIBRATION_SHARE = 0.5
MARGINAL = "marginal"
PER_GENERATOR = "per-generator"
SCORE_TEXT = (
    "1 - softmax(-d / T) of the generator, T fitted by likelihood on each split's"
    " calibration references"
)
_SEED_TAG = 0xC0F  # keeps these draws apart from the few-shot draws of the same seed
_SET_KEYS = ("coverage", "set_size", "singletons", "empty")


@dataclass(frozen=True)
class ConformalSettings:
    """What ``rsx eval --conformal`` measures and how the references are split."""

    coverages: tuple[float, ...]
    splits: int = DEFAULT_SPLITS
    calibration_share: float = DEFAULT_CALIBRATION_SHARE
    per_generator: bool = False
    seed: int = 0

    def validate(self) -> None:
        if not self.coverages:
            raise RsxError("give at least one coverage, e.g. --conformal 0.9,0.95")
        for value in self.coverages:
            if not 0.0 < value < 1.0:
                raise RsxError(f"coverage {value:g} must lie strictly between 0 and 1")
        if self.splits < 1:
            raise RsxError("--conformal-splits must be at least 1")
        if not 0.0 < self.calibration_share < 1.0:
            raise RsxError("--calibration-share must lie strictly between 0 and 1")


def parse_coverages(text: str | None) -> tuple[float, ...]:
    """'0.9,0.95' -> (0.9, 0.95), sorted and without repeats; empty text -> ()."""
    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    try:
        values = tuple(sorted({float(p) for p in parts}))
    except ValueError:
        raise RsxError(f"cannot read --conformal {text!r}: give coverages like 0.9,0.95") from None
    if any(not 0.0 < v < 1.0 for v in values):
        raise RsxError(
            f"cannot read --conformal {text!r}: coverages lie strictly between 0 and 1,"
            " e.g. 0.9,0.95"
        )
    return values


# ----------------------------------------------------------------------------- splits
def calibration_counts(counts: Mapping[str, int], share: float) -> dict[str, int]:
    """References per generator that calibrate in every split; at least one stays for testing.

    Refuses a generator with a single reference (it cannot be split).
    """
    lonely = sorted(g for g, n in counts.items() if n < 2)
    if lonely:
        raise RsxError(
            f"conformal evaluation needs at least 2 references per generator (one to calibrate,"
            f" one to test); {', '.join(lonely)} has fewer"
        )
    return {g: int(min(n - 1, max(1, round(share * n)))) for g, n in counts.items()}


def check_enough(counts: Mapping[str, int], settings: ConformalSettings) -> dict[str, int]:
    """The calibration counts, or a one-line refusal naming what the coverages need."""
    taken = calibration_counts(counts, settings.calibration_share)
    share = f"{settings.calibration_share:g}"
    top = max(settings.coverages)
    needed = conformal.references_needed(top)
    total = sum(taken.values())
    if total < needed:
        raise RsxError(
            f"--conformal {top:g} needs at least {needed} calibration references; a calibration"
            f" share of {share} of {sum(counts.values())} references gives {total}:"
            " raise --calibration-share or ingest more references"
        )
    if settings.per_generator:
        scarce = min(sorted(taken), key=lambda g: taken[g])
        if taken[scarce] < needed:
            raise RsxError(
                f"--per-generator at {top:g} needs {needed} calibration references per generator;"
                f" {scarce} gets {taken[scarce]} (a share of {share} of its {counts[scarce]}):"
                " raise --calibration-share, lower the coverage or ingest more references"
            )
    return taken


def stratified_split(
    labels: np.ndarray, taken: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, test) indices: ``taken[c]`` references of each class c drawn to calibrate."""
    calibration: list[np.ndarray] = []
    for c, count in enumerate(taken):
        members = np.flatnonzero(labels == c)
        calibration.append(rng.choice(members, size=count, replace=False))
    chosen = np.sort(np.concatenate(calibration))
    return chosen, np.setdiff1d(np.arange(len(labels)), chosen)


# ----------------------------------------------------------------------------- measuring
def _set_record(sets: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, Any]:
    """What one split's sets show on its test queries."""
    covered = sets[np.arange(len(labels)), labels]
    size = sets.sum(axis=1)
    return {
        "coverage": float(covered.mean()),
        "set_size": float(size.mean()),
        "singletons": float(np.mean(size == 1)),
        "empty": float(np.mean(size == 0)),
        "per_generator": [
            float(covered[labels == c].mean()) if np.any(labels == c) else np.nan
            for c in range(n_classes)
        ],
    }


def _thresholds(
    scores: np.ndarray, labels: np.ndarray, n_classes: int, coverage: float, per_generator: bool
) -> dict[str, np.ndarray]:
    """calibration kind -> (C,) thresholds: one repeated (marginal), or one per generator."""
    out = {MARGINAL: np.full(n_classes, conformal.conformal_quantile(scores, coverage))}
    if per_generator:
        names = [str(c) for c in labels]
        per = conformal.mondrian_quantiles(scores, names, coverage)
        out[PER_GENERATOR] = np.array([per[str(c)] for c in range(n_classes)])
    return out


def _one_split(
    distances: Mapping[str, np.ndarray],
    clean: str,
    labels: np.ndarray,
    calibration: np.ndarray,
    test: np.ndarray,
    settings: ConformalSettings,
    fixed_temperature: float,
) -> tuple[float, dict[str, dict[str, Any]], dict[tuple[str, float, str], dict[str, Any]]]:
    """Fitted temperature, per-condition accuracy and reliability bins, per-(condition,
    coverage, kind) set records."""
    references = distances[clean][calibration]  # calibration always uses clean references
    n_classes = references.shape[1]
    temperature = conformal.fit_temperature(references, labels[calibration])
    scores = conformal.true_class_scores(references, labels[calibration], temperature)
    thresholds = {
        cov: _thresholds(scores, labels[calibration], n_classes, cov, settings.per_generator)
        for cov in settings.coverages
    }
    y = labels[test]
    quality: dict[str, dict[str, Any]] = {}
    sets: dict[tuple[str, float, str], dict[str, Any]] = {}
    for cond, dist in distances.items():
        d = dist[test]
        fitted = conformal.softmax_probabilities(d, temperature)
        fixed = conformal.softmax_probabilities(d, fixed_temperature)
        quality[cond] = {
            "accuracy": float(np.mean(d.argmin(axis=1) == y)),
            "bins_fixed": conformal.reliability_bins(fixed, y),
            "bins_fitted": conformal.reliability_bins(fitted, y),
        }
        nonconformity = 1.0 - fitted
        for cov, by_kind in thresholds.items():
            for kind, limit in by_kind.items():
                sets[(cond, cov, kind)] = _set_record(nonconformity <= limit, y, n_classes)
    return temperature, quality, sets


def _stat(values: Sequence[float]) -> dict[str, float]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std}


def evaluate_conformal(
    generators: Sequence[str],
    labels: np.ndarray,
    distances: Mapping[str, np.ndarray],
    settings: ConformalSettings,
    fixed_temperature: float,
    *,
    clean: str,
) -> dict[str, Any]:
    """Coverage, set sizes and score calibration over seeded stratified splits (JSON-able
    except for NaN, which the caller cleans).

    ``distances`` maps each condition to the (n, C) aggregated distances of every reference to
    every candidate; columns follow ``generators`` and ``labels`` index them. Thresholds come
    from the ``clean`` condition's calibration references; every condition is tested.
    """
    settings.validate()
    labels = np.asarray(labels, dtype=int)
    counts = {g: int(np.sum(labels == c)) for c, g in enumerate(generators)}
    taken = check_enough(counts, settings)
    order = [taken[g] for g in generators]
    temperatures: list[float] = []
    accuracy: dict[str, list[float]] = {}
    bins: dict[str, dict[str, np.ndarray]] = {}
    sets: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for split in range(settings.splits):
        rng = np.random.default_rng([settings.seed, _SEED_TAG, split])
        calibration, test = stratified_split(labels, order, rng)
        temperature, split_quality, split_sets = _one_split(
            distances, clean, labels, calibration, test, settings, fixed_temperature
        )
        temperatures.append(temperature)
        for cond, values in split_quality.items():
            accuracy.setdefault(cond, []).append(values["accuracy"])
            pooled = bins.setdefault(cond, {})
            for kind in ("fixed", "fitted"):
                pooled[kind] = pooled.get(kind, 0) + values[f"bins_{kind}"]
        for key, record in split_sets.items():
            sets.setdefault(key, []).append(record)
    return {
        "score": SCORE_TEXT,
        "coverages": list(settings.coverages),
        "splits": settings.splits,
        "calibration_share": settings.calibration_share,
        "per_generator": settings.per_generator,
        "seed": settings.seed,
        "calibration_references": taken,
        "test_queries": {g: counts[g] - taken[g] for g in generators},
        "temperature": {"fixed": fixed_temperature, "fitted": _stat(temperatures)},
        "conditions": [
            {
                "condition": cond,
                "accuracy": _stat(accuracy[cond]),
                "ece_fixed": conformal.calibration_error_from_bins(bins[cond]["fixed"]),
                "ece_fitted": conformal.calibration_error_from_bins(bins[cond]["fitted"]),
            }
            for cond in accuracy
        ],
        "results": [
            _summarise_sets(cond, cov, kind, records, generators)
            for (cond, cov, kind), records in sets.items()
        ],
    }


def _summarise_sets(
    cond: str, coverage: float, kind: str, records: list[dict[str, Any]], generators
) -> dict[str, Any]:
    per_generator = np.array([r["per_generator"] for r in records], dtype=float)
    return {
        "condition": cond,
        "target": coverage,
        "calibration": kind,
        **{key: _stat([r[key] for r in records]) for key in _SET_KEYS},
        "per_generator": {g: _stat(per_generator[:, c].tolist()) for c, g in enumerate(generators)},
    }


def conformal_result(section: dict, cond: str, target: float, kind: str) -> dict | None:
    """The summary row of one (condition, target coverage, calibration kind), if measured."""
    for row in section["results"]:
        if (row["condition"], row["target"], row["calibration"]) == (cond, target, kind):
            return row
    return None
