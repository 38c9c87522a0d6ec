"""The resynthesis signal: how far a query lies from each candidate's resyntheses of its caption.

The method names the generator whose resynthesis lies closest to the query in embedding space
(j* = argmin_j d(E(s_j(p(I))), E(I))). Vectors are L2-normalised, so a distance follows from the
inner product (cosine, or euclidean). With K resyntheses per generator the K distances are
aggregated (min by default: the closest resynthesis counts, as max-similarity beat the mean in
published follow-up work). Every reader of this signal (a query, a calibration, an evaluation, a
layer of the embedder) computes it here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


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


def resynthesis_distances(
    query: np.ndarray, resyntheses: Sequence[np.ndarray] | np.ndarray, metric: str = "cosine"
) -> list[float]:
    """The distance of ``query`` to each of ``resyntheses`` (vectors, L2-normalised), in order."""
    if not len(resyntheses):
        return []
    matrix = np.asarray(resyntheses, dtype=np.float64).reshape(len(resyntheses), -1)
    similarities = matrix @ np.asarray(query, dtype=np.float64)
    return [similarity_to_distance(float(s), metric) for s in similarities]


def distance_matrix(
    queries: np.ndarray | Sequence[np.ndarray],
    resyntheses: Sequence[Sequence[np.ndarray | Sequence[np.ndarray]]],
    metric: str,
    aggregation: str,
    missing: float = float("nan"),
) -> np.ndarray:
    """(n, C) aggregated distance of each query to each candidate's resyntheses; ``missing``
    where a candidate has none. ``resyntheses``: per query, per candidate, its (K, d) vectors."""
    n = len(resyntheses)
    width = len(resyntheses[0]) if n else 0
    out = np.full((n, width), missing, dtype=np.float64)
    for i, per_candidate in enumerate(resyntheses):
        for c, vectors in enumerate(per_candidate):
            if len(vectors):
                out[i, c] = aggregate(
                    resynthesis_distances(queries[i], vectors, metric), aggregation
                )
    return out
