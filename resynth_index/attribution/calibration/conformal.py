"""Split conformal prediction sets over candidate generators, and temperature calibration.

A query's answer becomes a *set* of generators that contains the true one with a chosen
probability (the coverage, e.g. 95 %), provided the query is exchangeable with the references
the threshold was calibrated on (same kind of images, captions, candidates and post-processing).
Pure numpy: the lab, the store and the command line stay outside.

The nonconformity score
-----------------------
A reference of generator y, with aggregated distances d_1..d_C to the C candidates, scores

    s(x, y) = 1 - softmax(-d / T)_y

(one minus the calibrated probability of the true generator; Sadinle, Lei & Wasserman 2019). A
candidate enters a query's set when its own score is at most the calibrated quantile. Why this
score rather than the candidate's raw distance:

- it is relative: adding the same constant to every candidate's distance (a caption that every
  generator resynthesises badly, or well) leaves it unchanged. A raw-distance threshold mixes
  caption difficulty into the answer: hard captions get empty sets, easy ones every candidate;
- it adapts to the query: the set is one generator when one candidate is clearly closest and
  grows when several lie close together, which is the ambiguity the set should show;
- with calibrated probabilities, thresholding the true-class probability gives the smallest
  expected set size among sets with the same coverage (Sadinle et al.), hence the fitted
  temperature (``fit_temperature``) rather than the fixed display temperature;
- at query time it needs only the aggregated distances the ranking already holds.

The price: the softmax normalises over the candidates, so a calibration holds only for the
candidate set it was made with (``Calibration.applies_to`` checks it). An empty set is possible
("none of the candidates" at this coverage): it happens when no candidate stands out enough. It
does not detect a source outside the candidates; the guarantee assumes the true generator is one
of them (the lab's distance threshold is the open-set tool).

The guarantee, exactly
----------------------
With n calibration scores and coverage a, the threshold is the ceil((n+1)a)-th smallest score;
then P(true generator in the set) >= a, and < a + 1/(n+1) when scores have no ties, over the draw
of calibration references and query. It needs n >= ceil(a / (1 - a)) (19 for 95 %). Mondrian
(per-generator) calibration keeps one threshold per true generator and gives the same guarantee
for every generator separately, at the cost of needing that many references *per generator*.
The temperature is fitted on the same references as the threshold; strictly the guarantee wants
a score fixed before the calibration data are seen. One scalar fitted by likelihood (not by
coverage) moves coverage far less than the 1/(n+1) slack: in a seeded simulation (5 candidates,
4,000 calibrations each of n = 10, 20 and 40) coverage with the fitted temperature stayed within
0.001 of coverage with the true one. ``rsx eval --conformal`` measures coverage on held-out
references, so any effect on real data shows there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import numpy as np

from resynth_index.errors import RsxError

#: The nonconformity score implemented here (recorded in every calibration).
SCORE = "1-softmax"
#: The attribution method whose distances are scored.
METHOD = "resynthesis"
#: Search bounds of the fitted temperature (distances are cosine in [0, 2] or euclidean in [0, 2]).
TEMPERATURE_BOUNDS = (1e-4, 1e2)
_FORMAT = 1
#: Each reference's true generator, as a column index into the candidates.
Labels = Sequence[int] | np.ndarray


class TooFewReferences(RsxError):
    """Not enough calibration references for the asked coverage (the message says how many)."""

    def __init__(self, message: str, needed: int, have: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.have = have


# ----------------------------------------------------------------------------- quantiles
def _coverage_fraction(coverage: float) -> Fraction:
    """The coverage as an exact fraction of its decimal form (0.9 -> 9/10), validated."""
    value = float(coverage)
    if not 0.0 < value < 1.0:
        raise RsxError(f"coverage must lie strictly between 0 and 1, not {coverage!r}")
    return Fraction(repr(value))


def references_needed(coverage: float) -> int:
    """The fewest calibration scores that give a finite threshold: ceil(a / (1 - a))."""
    a = _coverage_fraction(coverage)
    return math.ceil(a / (1 - a))


def conformal_quantile(scores: Sequence[float] | np.ndarray, coverage: float) -> float:
    """The split-conformal threshold: the ceil((n+1) * coverage)-th smallest of n scores.

    A new score exchangeable with these is at most the threshold with probability >= coverage.
    Raises ``TooFewReferences`` when n < ceil(coverage / (1 - coverage)), where the threshold
    would be infinite (every candidate in every set).
    """
    values = np.asarray(scores, dtype=float).ravel()
    if np.isnan(values).any():
        raise ValueError("nonconformity scores must not be NaN")
    needed = references_needed(coverage)
    n = values.size
    if n < needed:
        raise TooFewReferences(
            f"{_percent(coverage)} coverage needs at least {needed} calibration references;"
            f" got {n}",
            needed,
            n,
        )
    k = math.ceil((n + 1) * _coverage_fraction(coverage))
    return float(np.partition(values, k - 1)[k - 1])


def mondrian_quantiles(
    scores: Sequence[float] | np.ndarray,
    groups: Sequence[str],
    coverage: float,
) -> dict[str, float]:
    """One threshold per group (true generator), each from that group's scores alone.

    Raises ``TooFewReferences`` naming the first group (by name) that has too few scores.
    """
    values = np.asarray(scores, dtype=float).ravel()
    names = np.asarray(groups, dtype=object)
    if names.shape != values.shape:
        raise ValueError("one group per score")
    out: dict[str, float] = {}
    for name in sorted(set(names.tolist())):
        members = values[names == name]
        try:
            out[name] = conformal_quantile(members, coverage)
        except TooFewReferences as error:
            raise TooFewReferences(
                f"{_percent(coverage)} coverage per generator needs at least {error.needed}"
                f" calibration references of each generator; {name} has {error.have}",
                error.needed,
                error.have,
            ) from None
    return out


def prediction_set(
    candidate_scores: Mapping[str, float],
    quantile: float | Mapping[str, float],
) -> list[str]:
    """The candidates whose nonconformity is at most the threshold, most plausible first.

    ``quantile`` is one threshold, or one per generator (Mondrian): then each candidate is
    compared with its own. The set may be empty: none of the candidates at this coverage.
    """
    chosen = []
    for name, score in candidate_scores.items():
        if isinstance(quantile, Mapping):
            if name not in quantile:
                raise ValueError(f"no calibrated threshold for candidate {name!r}")
            limit = quantile[name]
        else:
            limit = quantile
        if score <= limit:
            chosen.append(name)
    return sorted(chosen, key=lambda name: (candidate_scores[name], name))


# ----------------------------------------------------------------------------- scores
def softmax_probabilities(distances: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax(-d / T): the scores ``rsx query`` shows, for an (n, C) array."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    logits = -np.asarray(distances, dtype=float) / temperature
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def nonconformity(distances: np.ndarray, temperature: float) -> np.ndarray:
    """(n, C) nonconformity of every candidate for every query: 1 - softmax(-d / T)."""
    return 1.0 - softmax_probabilities(distances, temperature)


def true_class_scores(distances: np.ndarray, labels: Labels, temperature: float) -> np.ndarray:
    """(n,) nonconformity of each reference's true generator (the calibration scores)."""
    labels = np.asarray(labels, dtype=int)
    return nonconformity(distances, temperature)[np.arange(len(labels)), labels]


# ----------------------------------------------------------------------------- temperature
def negative_log_likelihood(distances: np.ndarray, labels: Labels, temperature: float) -> float:
    """Mean -log softmax(-d / T)_y over the references (y: the true generator's column)."""
    labels = np.asarray(labels, dtype=int)
    logits = -np.asarray(distances, dtype=float) / temperature
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(log_norm - logits[np.arange(len(labels)), labels]))


def fit_temperature(
    distances: np.ndarray,
    labels: Labels,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    tolerance: float = 1e-6,
) -> float:
    """The temperature that minimises the negative log-likelihood of the true generators.

    Golden-section search on log T within ``bounds``. The likelihood is convex in 1/T, hence
    unimodal in log T, so the search finds the optimum. References that every candidate ranks
    perfectly push T to the lower bound (any sharper softmax fits them better).
    """
    distances = np.asarray(distances, dtype=float)
    labels = np.asarray(labels, dtype=int)
    if distances.ndim != 2 or len(distances) != len(labels) or len(labels) == 0:
        raise ValueError("need an (n, C) distance array and n labels, n >= 1")

    def loss(log_t: float) -> float:
        return negative_log_likelihood(distances, labels, math.exp(log_t))

    low, high = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > tolerance:
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return math.exp((low + high) / 2.0)


def reliability_bins(probabilities: np.ndarray, labels: Labels, bins: int = 10) -> np.ndarray:
    """(3, bins) sums per equal-width confidence bin: query count, confidence, right answers.

    A query's confidence is its best score; it is right when that candidate is its true
    generator. Bins are [0, 1/bins], (1/bins, 2/bins], ..., ((bins-1)/bins, 1]. Sums (not means)
    so that several test sets can be pooled by adding their arrays.
    """
    probabilities = np.asarray(probabilities, dtype=float)
    labels = np.asarray(labels, dtype=int)
    out = np.zeros((3, bins))
    if len(labels) == 0:
        return out
    confidence = probabilities.max(axis=1)
    right = (probabilities.argmax(axis=1) == labels).astype(float)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    out[0] = np.bincount(which, minlength=bins)
    out[1] = np.bincount(which, weights=confidence, minlength=bins)
    out[2] = np.bincount(which, weights=right, minlength=bins)
    return out


def calibration_error_from_bins(sums: np.ndarray) -> float:
    """ECE from ``reliability_bins`` sums: sum over bins of |right - confidence| / queries."""
    total = sums[0].sum()
    if total == 0:
        return math.nan
    return float(np.abs(sums[2] - sums[1]).sum() / total)


def expected_calibration_error(probabilities: np.ndarray, labels: Labels, bins: int = 10) -> float:
    """Top-label ECE: sum over equal-width confidence bins of share * |accuracy - confidence|.

    ``probabilities`` is (n, C). NaN without queries. On few queries the estimate is biased
    upwards (each bin's accuracy is noisy), so pool test sets (``reliability_bins``) when you can.
    """
    return calibration_error_from_bins(reliability_bins(probabilities, labels, bins))


# ----------------------------------------------------------------------------- the record
def _percent(coverage: float) -> str:
    return f"{float(coverage) * 100:g} %"


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(sorted(mapping.items())))


@dataclass(frozen=True)
class Calibration:
    """A calibrated threshold for prediction sets, as stored in a lab and checked per query.

    ``quantile`` is the single threshold (``per_generator`` false) or None; ``quantiles`` holds
    one threshold per generator (``per_generator`` true), else it is empty. ``distance`` and
    ``aggregation`` are the scoring settings the references were scored with.
    """

    method: str
    coverage: float
    per_generator: bool
    quantile: float | None
    quantiles: Mapping[str, float]
    temperature: float
    reference_ids: tuple[int, ...]
    embedder_fingerprint: str
    generator_fingerprints: Mapping[str, str]
    distance: str
    aggregation: str
    created_at: str
    score: str = SCORE
    references_per_generator: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantiles", _frozen(self.quantiles))
        object.__setattr__(self, "generator_fingerprints", _frozen(self.generator_fingerprints))
        object.__setattr__(self, "references_per_generator", _frozen(self.references_per_generator))
        object.__setattr__(self, "reference_ids", tuple(int(i) for i in self.reference_ids))
        if self.per_generator != bool(self.quantiles) or self.per_generator == (
            self.quantile is not None
        ):
            raise ValueError("a calibration has one quantile, or one per generator")

    @property
    def generators(self) -> list[str]:
        """The candidate set the calibration was made with (sorted)."""
        return list(self.generator_fingerprints)

    def threshold_for(self, generator: str) -> float:
        """The threshold a candidate's nonconformity is compared with."""
        if self.per_generator:
            return self.quantiles[generator]
        assert self.quantile is not None
        return self.quantile

    def applies_to(
        self,
        embedder_fp: str,
        generator_fps: Mapping[str, str],
        *,
        distance: str | None = None,
        aggregation: str | None = None,
    ) -> str | None:
        """None when this calibration can score a query made with these models and candidates,
        else the one-line reason it cannot."""
        if embedder_fp != self.embedder_fingerprint:
            return (
                f"calibrated with embedder {self.embedder_fingerprint[:12]}, not {embedder_fp[:12]}"
            )
        asked, known = set(generator_fps), set(self.generator_fingerprints)
        if asked != known:
            missing, extra = sorted(known - asked), sorted(asked - known)
            parts = [f"lacks {', '.join(missing)}" if missing else ""]
            parts.append(f"adds {', '.join(extra)}" if extra else "")
            return (
                f"calibrated on candidates {', '.join(sorted(known))}; this candidate set "
                + " and ".join(p for p in parts if p)
            )
        changed = sorted(g for g in asked if generator_fps[g] != self.generator_fingerprints[g])
        if changed:
            return f"generator(s) changed since calibration: {', '.join(changed)}"
        if distance is not None and distance != self.distance:
            return f"calibrated with {self.distance} distance, not {distance}"
        if aggregation is not None and aggregation != self.aggregation:
            return f"calibrated with {self.aggregation} aggregation, not {aggregation}"
        return None

    def nonconformity(self, distances: Mapping[str, float]) -> dict[str, float]:
        """Each candidate's nonconformity from its aggregated distance (every candidate needed)."""
        if set(distances) != set(self.generator_fingerprints):
            raise ValueError(
                "distances must cover exactly the calibrated candidates: "
                + ", ".join(self.generators)
            )
        names = self.generators
        row = np.array([[distances[g] for g in names]], dtype=float)
        values = nonconformity(row, self.temperature)[0]
        return {g: float(v) for g, v in zip(names, values, strict=True)}

    def prediction_set(self, distances: Mapping[str, float]) -> list[str]:
        """The generators in the set for one query's aggregated distances, most plausible first."""
        threshold = dict(self.quantiles) if self.per_generator else self.quantile
        assert threshold is not None
        return prediction_set(self.nonconformity(distances), threshold)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (plain types only); ``from_dict`` reads it back."""
        return {
            "format": _FORMAT,
            "method": self.method,
            "score": self.score,
            "coverage": self.coverage,
            "per_generator": self.per_generator,
            "quantile": self.quantile,
            "quantiles": dict(self.quantiles),
            "temperature": self.temperature,
            "reference_ids": list(self.reference_ids),
            "references_per_generator": dict(self.references_per_generator),
            "embedder_fingerprint": self.embedder_fingerprint,
            "generator_fingerprints": dict(self.generator_fingerprints),
            "distance": self.distance,
            "aggregation": self.aggregation,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Calibration:
        """Read a ``to_dict`` record; a record of another format or score is refused."""
        if record.get("format") != _FORMAT:
            raise RsxError(f"unsupported calibration record format {record.get('format')!r}")
        if record.get("score") != SCORE:
            raise RsxError(f"unsupported nonconformity score {record.get('score')!r}")
        keys = [
            "method", "coverage", "per_generator", "quantile", "quantiles", "temperature",
            "reference_ids", "embedder_fingerprint", "generator_fingerprints", "distance",
            "aggregation", "created_at",
        ]  # fmt: skip
        missing = [k for k in keys if k not in record]
        if missing:
            raise RsxError(f"calibration record lacks {', '.join(missing)}")
        values = {k: record[k] for k in keys}
        values["quantile"] = None if record["quantile"] is None else float(record["quantile"])
        values["quantiles"] = {g: float(q) for g, q in record["quantiles"].items()}
        values["references_per_generator"] = dict(record.get("references_per_generator", {}))
        return cls(**values)


def calibrate(
    distances: np.ndarray,
    labels: Labels,
    generators: Sequence[str],
    *,
    coverage: float,
    per_generator: bool = False,
    reference_ids: Sequence[int],
    embedder_fingerprint: str,
    generator_fingerprints: Mapping[str, str],
    distance: str,
    aggregation: str,
    temperature: float | None = None,
    created_at: str | None = None,
) -> Calibration:
    """Calibrate prediction sets on references of known generator.

    ``distances`` is (n, C): each reference's aggregated distance to each candidate, columns in
    the order of ``generators``; ``labels`` the column of each reference's true generator.
    The temperature is fitted (``fit_temperature``) unless given. Raises ``TooFewReferences``
    when the references (per generator, with ``per_generator``) are too few for the coverage.
    """
    distances = np.asarray(distances, dtype=float)
    labels = np.asarray(labels, dtype=int)
    names = list(generators)
    if distances.shape != (len(labels), len(names)) or len(reference_ids) != len(labels):
        raise ValueError("need an (n, C) distance array, n labels, n reference ids, C names")
    if set(names) != set(generator_fingerprints):
        raise ValueError("one fingerprint per candidate generator")
    _coverage_fraction(coverage)  # validate before fitting anything
    fitted = fit_temperature(distances, labels) if temperature is None else float(temperature)
    scores = true_class_scores(distances, labels, fitted)
    groups = [names[y] for y in labels]
    if per_generator:
        quantile, quantiles = None, mondrian_quantiles(scores, groups, coverage)
        lacking = sorted(set(names) - set(quantiles))
        if lacking:
            raise TooFewReferences(
                f"per-generator calibration needs references of every candidate;"
                f" none of {', '.join(lacking)}",
                references_needed(coverage),
                0,
            )
    else:
        quantile, quantiles = conformal_quantile(scores, coverage), {}
    return Calibration(
        method=METHOD,
        coverage=float(coverage),
        per_generator=per_generator,
        quantile=quantile,
        quantiles=quantiles,
        temperature=fitted,
        reference_ids=tuple(int(i) for i in reference_ids),
        embedder_fingerprint=embedder_fingerprint,
        generator_fingerprints=dict(generator_fingerprints),
        distance=distance,
        aggregation=aggregation,
        created_at=created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        references_per_generator={g: groups.count(g) for g in names},
    )
