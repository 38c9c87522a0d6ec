"""From a signal's distances to a verdict: ranking, relative scores, margin, and its reason.

Scores are a softmax over negative aggregated distances: a relative score among the candidates
asked, not a probability. The verdict is one of four states, each with a one-line reason:
- a generator's name: the closest candidate, clear of the others by at least the margin floor;
- ``inconclusive``: two or more candidates lie within the margin floor of the best (``tied``);
- ``unknown``: the best distance exceeds the lab's threshold (open set: the source is likely none
  of the candidates);
- ``no-evidence``: no candidate has a resynthesis of this caption to compare with.
Without a threshold the answer is closed-set: the source may be none of the candidates, and the
reason says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from resynth_index.attribution.answer import CLOSED_SET_NOTE, INCONCLUSIVE, NO_EVIDENCE, UNKNOWN
from resynth_index.attribution.evidence.resynthesis import aggregate


def softmax_scores(distances: Sequence[float], temperature: float) -> list[float]:
    """softmax(-d / T): closer generators score higher; the scores sum to 1."""
    if not distances:
        return []
    logits = [-d / temperature for d in distances]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


@dataclass(frozen=True)
class GeneratorScore:
    generator: str
    distance: float  # aggregated over the generator's resyntheses
    score: float
    distances: tuple[float, ...]  # every resynthesis distance, in resynthesis order


@dataclass(frozen=True)
class Attribution:
    ranking: list[GeneratorScore]  # best first
    verdict: str  # the best generator, or one of VERDICT_STATES
    margin: float | None  # second-best distance minus best distance
    unranked: list[str] = field(default_factory=list)  # candidates without any resynthesis
    reason: str = ""  # why this verdict, in one line
    tied: list[str] = field(default_factory=list)  # within the margin floor of the best
    threshold: float | None = None  # the threshold applied (None: closed set)
    margin_floor: float = 0.0  # the margin floor applied


def attribute(
    distances: Mapping[str, Sequence[float]],
    *,
    aggregation: str = "min",
    temperature: float = 0.05,
    threshold: float | None = None,
    margin_floor: float = 0.0,
) -> Attribution:
    """Rank candidate generators by their aggregated distance to the query and decide.

    ``distances`` maps each candidate to the distances of its resyntheses; a candidate with none
    (an imported generator still pending) is left out of the ranking and listed in ``unranked``.
    The verdict is 'no-evidence' when nothing can be ranked, 'unknown' when the best distance
    exceeds ``threshold``, 'inconclusive' when another candidate lies within ``margin_floor`` of
    the best, and the best generator otherwise (see the module docstring).
    """
    ranked = sorted(
        (
            (name, aggregate(values, aggregation), tuple(values))
            for name, values in distances.items()
            if values
        ),
        key=lambda item: (item[1], item[0]),
    )
    scores = softmax_scores([d for _, d, _ in ranked], temperature)
    ranking = [
        GeneratorScore(generator=name, distance=d, score=s, distances=values)
        for (name, d, values), s in zip(ranked, scores, strict=True)
    ]
    unranked = sorted(name for name, values in distances.items() if not values)
    settings: dict[str, Any] = {  # typed: the values differ in type
        "unranked": unranked,
        "threshold": threshold,
        "margin_floor": margin_floor,
    }
    if not ranking:
        lacking = ", ".join(unranked) or "none given"
        reason = f"no resynthesis of this caption by any candidate ({lacking})"
        return Attribution(ranking=[], verdict=NO_EVIDENCE, margin=None, reason=reason, **settings)
    margin = ranking[1].distance - ranking[0].distance if len(ranking) > 1 else None
    best = ranking[0]
    # an exact tie is undecided whatever the floor (even 0): nothing tells the two apart
    tied = [
        g.generator
        for g in ranking
        if g.distance - best.distance < margin_floor or g.distance == best.distance
    ]
    if threshold is not None and best.distance > threshold:
        verdict = UNKNOWN
        reason = f"beyond threshold {threshold:g}: best {best.generator} at {best.distance:.4g}"
        tied = []
    elif len(tied) > 1:
        verdict = INCONCLUSIVE
        names = f"{', '.join(tied[:-1])} and {tied[-1]}"
        if margin == 0:
            reason = f"{names} are exactly tied at {best.distance:.4g}: nothing tells them apart"
        else:
            reason = (
                f"{names} lie within the margin floor {margin_floor:g} of each other"
                f" (margin {margin:.2g})"
            )
    else:
        verdict = best.generator
        tied = []
        reason = f"closest: {best.generator} at {best.distance:.4g}"
        if margin is not None:
            reason += f", {margin:.4g} ahead of {ranking[1].generator}"
        if threshold is None:
            reason += f"; {CLOSED_SET_NOTE}"
    return Attribution(
        ranking=ranking, verdict=verdict, margin=margin, reason=reason, tied=tied, **settings
    )
