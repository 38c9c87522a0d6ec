"""The answer: the record every query ends in, its verdict words and the notes it carries.

A ``QueryResult`` is what ``rsx query --json`` prints, what the service returns and what the
audit row stores, whole. It is made once, by the stage that answers (``pipeline/query.py``), from
the evidence (``evidence/``), the combination of signals (``combination.py``) and the lab's
calibration (``calibration/``), each of which returns a new answer rather than changing one.

The verdict is a generator's name or one of the states: ``inconclusive`` (two or more candidates
cannot be told apart), ``unknown`` (past the lab's threshold: likely none of the candidates),
``no-evidence`` (no candidate has a resynthesis of the caption to compare with).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from resynth_index.errors import RsxError

UNKNOWN = "unknown"
INCONCLUSIVE = "inconclusive"
NO_EVIDENCE = "no-evidence"
VERDICT_STATES = (UNKNOWN, INCONCLUSIVE, NO_EVIDENCE)
CLOSED_SET_NOTE = "closed set: the source may be none of these candidates"


def score_meaning(temperature: float) -> str:
    """What an answer's ``score`` is, in words an answer carries (``score_meaning``): a softmax
    over the candidates asked, so one candidate alone always scores 1."""
    return f"relative among candidates (softmax of -distance/{temperature:g})"


SCORE_MEANING = score_meaning(0.05)  # at the default temperature
#: The line a rendered answer puts under its scores (the terminal table, the HTML report).
SCORE_FOOTNOTE = "rel.score: relative score among these candidates, not a probability"


def no_evidence_note(verdict: str, lacking: Sequence[str]) -> str:
    """What a 'no-evidence' answer lacked: the candidates without a resynthesis of its caption
    ("" for any other verdict)."""
    if verdict != NO_EVIDENCE:
        return ""
    return f"no evidence: no resynthesis of this caption by {', '.join(lacking) or 'any candidate'}"


def exact_match_note(generators: Sequence[str]) -> str:
    """The warning an answer carries when the query's bytes are a stored resynthesis by
    ``generators`` ("" when none): its distance 0 to itself is no evidence of its origin."""
    if not generators:
        return ""
    return (
        f"this image is itself a stored resynthesis by {', '.join(generators)}:"
        " a distance of 0 says nothing about its origin"
    )


@dataclass
class RankedGenerator:
    generator: str
    distance: float
    score: float  # relative among the candidates asked (see QueryResult.score_meaning)
    distances: list[float]
    nearest_sha256: str  # the resynthesis closest to the query (for reports)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RankedGenerator:
        """One ranking entry from its JSON form (``asdict``), as stored in an answer."""
        if not isinstance(data, Mapping) or "generator" not in data or "distance" not in data:
            raise RsxError("not a stored ranking entry: it needs a generator and a distance")
        distance = float(data["distance"])
        return cls(
            generator=str(data["generator"]),
            distance=distance,
            score=float(data.get("score", 0.0)),
            distances=[float(d) for d in data.get("distances") or [distance]],
            nearest_sha256=str(data.get("nearest_sha256") or ""),
        )


@dataclass
class QueryResult:
    """One answer: the verdict, how firm it is, the evidence, and what reproduces it.

    Every field after ``fingerprints`` was added after the first release; ``from_json`` fills
    them with defaults when it reads an answer stored before they existed.
    """

    image: str
    sha256: str
    caption: str
    caption_source: str
    verdict: str  # the best generator, or inconclusive / unknown / no-evidence
    ranking: list[RankedGenerator]
    margin: float | None
    generated: int
    reused: int
    pending: list[str]
    not_generated: list[str]  # runnable candidates skipped because generation was off
    candidates: list[str]
    distance: str
    aggregation: str
    fingerprints: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)  # embedded evidence, never trusted
    query_id: int | None = None
    verdict_reason: str = ""  # why this verdict, in one line
    tied: list[str] = field(default_factory=list)  # the candidates an inconclusive answer names
    threshold: float | None = None  # the 'unknown' threshold applied; None: closed set
    margin_floor: float = 0.0  # the margin under which the answer is inconclusive
    closed_set: bool = True  # no threshold: the source may be none of the candidates
    without_resynthesis: list[str] = field(default_factory=list)  # candidates not compared
    exact_match_of: list[str] = field(default_factory=list)  # its bytes are their resynthesis
    score_meaning: str = SCORE_MEANING
    temperature: float = 0.05  # of the softmax behind ``score``
    rsx_version: str = ""  # the rsx that answered ("" in answers stored before it was kept)
    resyntheses_per_generator: dict[str, int] = field(default_factory=dict)  # K used
    generation: dict[str, dict[str, Any]] = field(default_factory=dict)  # settings + seeds used
    # with a stored calibration (rsx calibrate, attribution/calibration/sets.py); None without one
    prediction_set: list[str] | None = None  # the candidates at ``coverage``, best first
    coverage: float | None = None
    calibration_id: int | None = None  # the calibration behind the set and the scores
    calibration_note: str | None = None  # why the lab's calibration was not used
    method: str = "resynthesis"  # or "fused" (attribution/combination.py)
    fusion: dict[str, Any] | None = None  # fused only: weights, per-generator signals, scores

    def to_json(self) -> dict[str, Any]:
        """The answer as ``rsx query --json`` prints it and the audit row stores it."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QueryResult:
        """The answer ``to_json`` made (``--json`` output, an audit row's ``result_json``).

        The inverse of ``to_json``. An answer stored by an older rsx lacks the newer fields:
        they take their defaults (``closed_set`` follows the threshold: without one, the answer
        was closed-set). Keys this version does not know are ignored, so a newer answer reads
        too. Raises RsxError when ``data`` is not an answer at all.
        """
        if not isinstance(data, Mapping):
            raise RsxError("not a stored answer: expected a JSON object")
        lacking = [key for key in ("image", "sha256", "verdict") if key not in data]
        if lacking:
            raise RsxError(f"not a stored answer: it lacks {', '.join(lacking)}")
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {
            key: copy.deepcopy(value) for key, value in data.items() if key in known
        }
        ranking = data.get("ranking") or []
        if not isinstance(ranking, list):
            raise RsxError("not a stored answer: its ranking is not a list")
        values["ranking"] = [RankedGenerator.from_json(entry) for entry in ranking]
        for key, default in _OLD_ANSWER_DEFAULTS.items():
            if values.get(key) is None:
                values[key] = copy.deepcopy(default)
        values.setdefault("margin", None)
        values.setdefault("closed_set", values.get("threshold") is None)
        return cls(**values)


#: What an answer stored before a field was required gets for it (older rows always had these,
#: but an answer written by hand or cut short should still read).
_OLD_ANSWER_DEFAULTS: dict[str, Any] = {
    "caption": "",
    "caption_source": "",
    "generated": 0,
    "reused": 0,
    "pending": [],
    "not_generated": [],
    "candidates": [],
    "distance": "cosine",
    "aggregation": "min",
    "fingerprints": {},
    "metadata": {},
}


@dataclass
class QueryFailure:
    image: str
    error: str
