"""From distances to an answer: aggregation over resyntheses, ranking, scores, margin, 'unknown'.

The method names the generator whose resynthesis lies closest to the query in embedding space
(j* = argmin_j d(E(s_j(p(I))), E(I))). With K resyntheses per generator the K distances are
aggregated (min by default: the closest resynthesis counts, as max-similarity beat the mean in
published follow-up work). Scores are a softmax over negative aggregated distances.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

UNKNOWN = "unknown"


def similarity_to_distance(similarity: float, metric: str = "cosine") -> float:
    """Distance between two L2-normalised vectors from their inner product."""
    if metric == "cosine":
        return 1.0 - similarity
    if metric == "euclidean":
        return math.sqrt(max(0.0, 2.0 - 2.0 * similarity))
    raise ValueError(f"unknown distance {metric!r}")


def aggregate(distances: Sequence[float], how: str = "min") -> float:
    if not distances:
        raise ValueError("no distances to aggregate")
    if how == "min":
        return min(distances)
    if how == "mean":
        return sum(distances) / len(distances)
    raise ValueError(f"unknown aggregation {how!r}")


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
    verdict: str  # the best generator, or 'unknown'
    margin: float | None  # second-best distance minus best distance
    unranked: list[str] = field(default_factory=list)  # candidates without any resynthesis


def attribute(
    distances: Mapping[str, Sequence[float]],
    *,
    aggregation: str = "min",
    temperature: float = 0.05,
    threshold: float | None = None,
) -> Attribution:
    """Rank candidate generators by their aggregated distance to the query.

    ``distances`` maps each candidate to the distances of its resyntheses; a candidate with none
    (an imported generator still pending) is left out of the ranking and listed in ``unranked``.
    The verdict is 'unknown' when nothing can be ranked or the best distance exceeds ``threshold``.
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
    if not ranking:
        return Attribution(ranking=[], verdict=UNKNOWN, margin=None, unranked=unranked)
    margin = ranking[1].distance - ranking[0].distance if len(ranking) > 1 else None
    best = ranking[0]
    verdict = UNKNOWN if threshold is not None and best.distance > threshold else best.generator
    return Attribution(ranking=ranking, verdict=verdict, margin=margin, unranked=unranked)
