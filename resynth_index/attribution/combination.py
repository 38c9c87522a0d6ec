"""Fused attribution: resynthesis distance and reconstruction distance, z-scored and weighted.

Resynthesis tells generators apart by what they draw from a caption; look-alike generators (a base
model and its fine-tunes) draw alike. The reconstruction distance (``evidence.reconstruction``: how
much a candidate's own autoencoder changes the query) is a second, caption-free signal. The fusion
rule, shared by ``rsx query --method fused`` and ``rsx eval --methods fused``:

1. per query, each signal is turned into a similarity (minus the distance) and z-scored across the
   candidates that have it (mean 0, spread 1; a signal whose values are all equal contributes 0);
2. each candidate's fused score is the weighted mean of the z-scores it has:
   ``sum_s w_s z_s / sum_s w_s`` over the signals present for that candidate, so a candidate
   without a reconstruction (an imported generator) falls back to its resynthesis signal alone,
   and one without a resynthesis of the caption to its reconstruction alone;
3. a candidate with no signal at all ranks last.

Signals beyond these two are the ``layer-N`` ones (``evidence.layers``): the resynthesis distance
read at vision block N of the lab's embedder.

The weights are fixed in advance (``DEFAULT_WEIGHTS``: equal) or chosen on references of known
generator by ``calibration.fusion_weights.fusion_weight_choice`` (the best accuracy on a grid:
the rule of ``rsx eval``'s ``fused-loo`` on its training references, and of ``rsx calibrate
--method fused`` on the lab's references); never on the queries they then rank. The accuracy of
the chosen weights on the references they were chosen on is in-sample (training accuracy); the
rule's honest figure is its nested leave-one-out accuracy, which ``fusion_weight_choice`` also
gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resynth_index.attribution.answer import INCONCLUSIVE, NO_EVIDENCE, UNKNOWN, QueryResult
from resynth_index.errors import RsxError

RESYNTHESIS = "resynthesis"


RECONSTRUCTION = "reconstruction"


QUERY_METHODS = ("resynthesis", "fused")


#: Fixed weights of the query-time fusion: equal (see the module docstring).
DEFAULT_WEIGHTS: dict[str, float] = {RESYNTHESIS: 1.0, RECONSTRUCTION: 1.0}


def nan_zscore_rows(similarity: np.ndarray) -> np.ndarray:
    """Z-score each row over its finite entries; NaN stays NaN; a constant row gives zeros."""
    values = np.asarray(similarity, dtype=np.float64)
    present = np.isfinite(values)
    count = present.sum(axis=1, keepdims=True)
    safe = np.where(present, values, 0.0)
    mean = safe.sum(axis=1, keepdims=True) / np.maximum(count, 1)
    centred = np.where(present, values - mean, 0.0)
    std = np.sqrt((centred * centred).sum(axis=1, keepdims=True) / np.maximum(count, 1))
    z = centred / np.where(std > 0, std, 1.0)
    return np.where(present, z, np.nan)


def fuse(
    distances: Mapping[str, np.ndarray], weights: Mapping[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Fused scores (higher = more likely) of (n queries, C candidates) distance arrays.

    ``distances``: signal name -> (n, C) distances, NaN where the signal is missing for that
    candidate. Signals without a positive weight are ignored. Returns ``(scores, covered)``:
    ``covered`` is False where a candidate had no weighted signal; its score is then set below the
    row's lowest (finite) score, so it ranks last.
    """
    unknown = sorted(set(weights) - set(distances))
    if unknown:
        raise RsxError(f"fusion weight(s) for unknown signal(s): {', '.join(unknown)}")
    used = [name for name in sorted(distances) if weights.get(name, 0.0) > 0]
    if not used:
        raise RsxError("fusion needs a positive weight on at least one signal")
    shape = np.asarray(distances[used[0]]).shape
    total = np.zeros(shape)
    weight_sum = np.zeros(shape)
    for name in used:
        z = nan_zscore_rows(-np.asarray(distances[name], dtype=np.float64))
        present = np.isfinite(z)
        total += weights[name] * np.where(present, z, 0.0)
        weight_sum += weights[name] * present
    covered = weight_sum > 0
    scores = np.where(covered, total / np.where(covered, weight_sum, 1.0), np.nan)
    return rank_missing_last(scores), covered


def rank_missing_last(scores: np.ndarray) -> np.ndarray:
    """Replace NaN by one less than the row's lowest finite score (0 when the row has none)."""
    scores = np.array(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    lowest = np.where(finite, scores, np.inf).min(axis=1, keepdims=True)
    floor = np.where(np.isfinite(lowest), lowest - 1.0, 0.0)
    return np.where(finite, scores, floor)


def parse_weights(text: str | None) -> dict[str, float]:
    """``"resynthesis=1,reconstruction=0.5"`` -> weights; empty -> {}. Negative ones refused."""
    weights: dict[str, float] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            number = float(value) if sep else float("nan")
        except ValueError:
            number = float("nan")
        if not sep or not name.strip() or not np.isfinite(number) or number < 0:
            raise RsxError(
                f"cannot read fusion weight {part!r}: give signal=weight pairs such as"
                " resynthesis=1,reconstruction=0.5 (non-negative numbers)"
            )
        weights[name.strip()] = number
    return weights


def fixed_weights(names: Sequence[str], given: Mapping[str, float]) -> dict[str, float]:
    """The fixed fusion weights, summing to 1: those given (signals not named weigh 0), else
    equal ones (the fusion is the same for any positive multiple of the weights)."""
    if not given:
        return {n: round(1.0 / len(names), 10) for n in names}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise RsxError(
            f"--fusion-weights names signal(s) not measured: {', '.join(unknown)}"
            f" (measured: {', '.join(names)})"
        )
    weights = {n: float(given.get(n, 0.0)) for n in names}
    if not any(w > 0 for w in weights.values()):
        raise RsxError("--fusion-weights must give at least one signal a positive weight")
    total = sum(weights.values())
    return {n: round(w / total, 10) for n, w in weights.items()}


@dataclass
class FusedRanking:
    """The fused ranking of one query's candidates and the evidence behind it."""

    order: list[str]  # best first (ties broken by name)
    scores: dict[str, float]  # fused score per candidate (higher = more likely)
    signals: dict[str, dict[str, float | None]]  # signal -> candidate -> distance (None: missing)
    weights: dict[str, float]
    unsupported: dict[str, str] = field(default_factory=dict)  # no reconstruction, and why

    def to_json(self) -> dict:
        return {
            "order": list(self.order),
            "scores": dict(self.scores),
            "signals": {k: dict(v) for k, v in self.signals.items()},
            "weights": dict(self.weights),
            "unsupported": dict(self.unsupported),
        }


def fuse_one(
    candidates: Sequence[str],
    signals: Mapping[str, Mapping[str, float | None]],
    weights: Mapping[str, float] | None = None,
    unsupported: Mapping[str, str] | None = None,
) -> FusedRanking:
    """Fuse one query's signals (signal -> candidate -> distance or None) into a ranking."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    weights = {k: v for k, v in weights.items() if k in signals}
    arrays = {
        name: np.array(
            [[np.nan if values.get(c) is None else float(values[c]) for c in candidates]]  # type: ignore[arg-type]
        )
        for name, values in signals.items()
    }
    scores, _covered = fuse(arrays, weights)
    by_name = {c: float(scores[0, k]) for k, c in enumerate(candidates)}
    order = sorted(candidates, key=lambda c: (-by_name[c], c))
    clean = {
        name: {c: (None if values.get(c) is None else float(values[c])) for c in candidates}  # type: ignore[arg-type]
        for name, values in signals.items()
    }
    return FusedRanking(order, by_name, clean, weights, dict(unsupported or {}))


#: What ``score`` means in a fused answer (``QueryResult.score_meaning``).
FUSED_SCORE_MEANING = "relative among candidates (softmax of the fused z-score)"


def apply_fusion(
    result: QueryResult,
    reconstruction: Mapping[str, float | None] | None,
    weights: Mapping[str, float] | None = None,
    unsupported: Mapping[str, str] | None = None,
    *,
    layers: Mapping[str, Mapping[str, float | None]] | None = None,
    origin: Mapping[str, Any] | None = None,
) -> QueryResult:
    """A resynthesis answer turned into a fused one (``method`` "fused"): a new answer,
    ``result`` unchanged.

    The ranking is re-ordered by fused score and each entry's ``score`` becomes a softmax of the
    fused z-scores; ``fusion`` records the weights, every signal's value per candidate, the fused
    scores, the candidates without an autoencoder and ``origin`` (the layers, and where the
    weights came from: ``calibration.fusion_weights.QueryFusion.to_json``). ``reconstruction``
    None: not measured (its weight is 0); ``layers``: the ``layer-N`` signals. The verdict
    follows the fused ranking when the resynthesis answer named a generator or was
    inconclusive; 'unknown' (the lab's threshold on the resynthesis distance) and 'no-evidence'
    stay as they are. ``margin`` stays the resynthesis margin; ``fusion["margin"]`` is the fused
    one (best minus second-best z-score).
    """
    candidates = list(result.candidates)
    resynthesis: dict[str, float | None] = dict.fromkeys(candidates)
    resynthesis.update({entry.generator: entry.distance for entry in result.ranking})
    signals: dict[str, Mapping[str, float | None]] = {RESYNTHESIS: resynthesis}
    if reconstruction is not None:
        signals[RECONSTRUCTION] = dict(reconstruction)
    signals.update(layers or {})
    all_weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    fused = fuse_one(candidates, signals, all_weights, unsupported)
    ranked = {entry.generator for entry in result.ranking}
    order = [c for c in fused.order if c in ranked]
    margin = fused.scores[order[0]] - fused.scores[order[1]] if len(order) > 1 else None
    record = {**fused.to_json(), "weights": all_weights, "margin": margin, **(origin or {})}
    answer = dataclasses.replace(result, method="fused", fusion=record)
    if not order:
        return answer
    used = [name for name in sorted(signals) if all_weights.get(name, 0.0) > 0]
    by_name = {entry.generator: entry for entry in result.ranking}
    logits = np.array([fused.scores[c] for c in order])
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    ranking = [
        dataclasses.replace(by_name[c], score=float(probability))
        for c, probability in zip(order, probabilities, strict=True)
    ]
    answer = dataclasses.replace(answer, ranking=ranking, score_meaning=FUSED_SCORE_MEANING)
    if result.verdict in (UNKNOWN, NO_EVIDENCE):
        return answer
    best = order[0]
    tied = [c for c in order if fused.scores[c] == fused.scores[best]]
    if len(tied) > 1:
        reason = f"fused: {' and '.join(tied)} are exactly tied"
        return dataclasses.replace(answer, verdict=INCONCLUSIVE, tied=tied, verdict_reason=reason)
    second = f" over {order[1]}" if len(order) > 1 else ""
    reason = (
        f"fused ({' + '.join(used)}): best {best}, z-score margin"
        f" {margin if margin is not None else 0:.2g}{second}"
    )
    return dataclasses.replace(answer, verdict=best, tied=[], verdict_reason=reason)


def fusion_summary(fusion: Mapping[str, Any]) -> str:
    """One line for people: the weights of a fused answer and where they came from."""
    weights = fusion.get("weights") or {}
    shown = ", ".join(f"{name} {float(w):g}" for name, w in sorted(weights.items()))
    calibration = fusion.get("calibration")
    if fusion.get("source") == "recorded" and calibration:
        origin = (
            f"chosen on {calibration.get('references')} references by fused calibration"
            f" #{calibration.get('id')} ({calibration.get('created_at')}"
            f"{calibration_accuracy_text(calibration)})"
        )
    else:
        origin = "fixed (equal)"
    return f"fusion weights: {shown}; {origin}"


def calibration_accuracy_text(calibration: Mapping[str, Any]) -> str:
    """The accuracies a fused answer's ``calibration`` block quotes, as text to append:
    ", nested leave-one-out accuracy N %, training accuracy (in-sample) M %". Answers and
    calibrations from before the nested figure hold only the in-sample one, as ``loo_accuracy``:
    it is shown as the training accuracy, and the nested one as not measured."""
    nested = calibration.get("nested_loo_accuracy")
    training = calibration.get("training_accuracy", calibration.get("loo_accuracy"))
    parts = []
    if nested is not None:
        parts.append(f"nested leave-one-out accuracy {nested * 100:.1f} %")
    elif training is not None:
        parts.append("no nested leave-one-out accuracy (calibrated before it was measured)")
    if training is not None:
        parts.append(f"training accuracy (in-sample) {training * 100:.1f} %")
    return "".join(f", {part}" for part in parts)


def fusion_table(fusion: Mapping[str, Any]) -> list[list[str]]:
    """The fused signals per candidate, best first: a header row then one row per candidate
    (fused score, then each signal's distance; "-" where a candidate has none)."""
    signals = fusion.get("signals") or {}
    names = sorted(signals, key=lambda s: (s != RESYNTHESIS, s != RECONSTRUCTION, s))
    rows = [["generator", "fused", *names]]
    scores = fusion.get("scores") or {}
    for candidate in fusion.get("order") or []:
        values = [signals[name].get(candidate) for name in names]
        rows.append(
            [
                candidate,
                f"{scores.get(candidate, float('nan')):.3f}",
                *("-" if v is None else f"{v:.4f}" for v in values),
            ]
        )
    return rows
