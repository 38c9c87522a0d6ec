"""Prediction sets at query time: which of the lab's calibrations applies to a query, and the
answer it then gives.

``rsx query`` looks up the newest active calibration of its candidate set (``for_query``) and
applies it to each answer (``apply``): the answer gains its prediction set, the coverage and the
calibration's id, and its scores use the fitted temperature. A calibration made with other
models or settings than the query's is not used, and the answer says why in
``calibration_note``: another embedder, another candidate set (a generator added, retired or
left out), a generator whose fingerprint changed, another distance or aggregation, another
number of resyntheses per generator, or a candidate with no resynthesis of the query's caption
(an imported one still pending, a runnable one skipped by ``--no-generate``): the set is over
every calibrated candidate, so without a candidate's distance it cannot be computed. A runnable
candidate with only some of its K resyntheses (``--no-generate``) is not scored as the
references were, so the calibration is not used either. How a calibration is made:
``pipeline/calibrate.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from resynth_index.attribution.answer import CLOSED_SET_NOTE, QueryResult
from resynth_index.attribution.calibration import conformal
from resynth_index.attribution.verdict import softmax_scores
from resynth_index.errors import RsxError
from resynth_index.store import calibrations
from resynth_index.store.calibrations import StoredCalibration
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    from resynth_index.lab import Lab


#: The methods ``rsx calibrate`` can calibrate: prediction sets of ``resynthesis`` answers, and
#: the weights of the ``fused`` method chosen on the references (``pipeline/fusion_lab.py``).
METHODS = (conformal.METHOD, "fused")


# ----------------------------------------------------------------------------- words
def level(coverage: float) -> str:
    """0.95 -> '95 %'."""
    return f"{float(coverage) * 100:g} %"


def set_meaning(prediction_set: Sequence[str], coverage: float) -> str:
    """What a prediction set says, in the words an answer shows."""
    at = level(coverage)
    if not prediction_set:
        return f"none of the candidates at {at} coverage (open-set answer)"
    if len(prediction_set) == 1:
        return f"{prediction_set[0]} alone at {at} coverage"
    return f"one of: {', '.join(prediction_set)} — cannot narrow further at {at}"


def calibrated_score_meaning(temperature: float, references: int, calibration_id: int) -> str:
    """``score_meaning`` of an answer whose scores use a calibration's fitted temperature."""
    return (
        f"relative among candidates (softmax of -distance/{temperature:.4g}), calibrated on"
        f" {references} references (calibration #{calibration_id})"
    )


def not_used(calibration_id: int, reason: str) -> str:
    """The ``calibration_note`` of an answer that could not use a calibration."""
    return f"calibration #{calibration_id} not used: {reason}"


def check_method(method: str) -> None:
    """Refuse, in one line, a method ``rsx calibrate`` cannot calibrate."""
    if method in METHODS:
        return
    raise RsxError(f"unknown method {method!r}: 'rsx calibrate' supports {', '.join(METHODS)}")


# ----------------------------------------------------------------------------- using one
@dataclass(frozen=True)
class QueryCalibration:
    """What one ``run_queries`` call does with the lab's calibrations.

    ``calibration`` is set when the stored one ``calibration_id`` applies to the call's
    candidates, models and settings; otherwise ``note`` says why it is not used.
    """

    calibration_id: int
    calibration: conformal.Calibration | None
    references: int = 0
    note: str | None = None


def for_query(
    lab: Lab, generators: Sequence[GeneratorRow], resyntheses: Mapping[str, int]
) -> QueryCalibration | None:
    """The calibration a call's answers use, or why the lab's newest one is not used.

    The newest active calibration of exactly this candidate set is checked against the
    embedder, the candidates' fingerprints, the lab's distance and aggregation, and the
    resyntheses per generator (``resyntheses``: name -> K this call uses). Without one, the
    newest active calibration of any candidate set is named with the reason it does not apply
    and how to use it (``candidates_fix``). None when the lab has no calibration at all (today's
    answers, unchanged).
    """
    names = [row.name for row in generators]
    with lab.session() as session:  # this set's, else the newest of any set
        stored = calibrations.calibration_for(session, names, conformal.METHOD)
    if stored is None:
        return None
    try:
        calibration = conformal.Calibration.from_dict(stored.record)
    except (RsxError, TypeError, ValueError, KeyError) as error:
        return QueryCalibration(stored.id, None, note=not_used(stored.id, str(error)))
    reason = calibration.applies_to(
        lab.fingerprint,
        {row.name: row.fingerprint for row in generators},
        distance=lab.settings.distance,
        aggregation=lab.settings.aggregation,
    )
    other_set = set(stored.candidates) != set(names)
    if reason is not None and other_set and calibration.embedder_fingerprint == lab.fingerprint:
        active = {row.name for row in lab.generators()}  # the reason is the set: say the fix
        reason += f"; {candidates_fix(stored.candidates, active)}"
    if reason is None:
        reason = _resyntheses_reason(stored, resyntheses)
    if reason is not None:
        return QueryCalibration(stored.id, None, note=not_used(stored.id, reason))
    return QueryCalibration(stored.id, calibration, references=len(calibration.reference_ids))


def candidates_fix(
    calibrated: Sequence[str], active: Collection[str], calibrate: str = "rsx calibrate"
) -> str:
    """How a query comes to use a calibration made for another candidate set: ask exactly its
    candidates (once, or as the lab's default), restoring any retired since; or calibrate the
    set asked (``calibrate``: the command that does, e.g. 'rsx calibrate --method fused')."""
    names = ",".join(sorted(calibrated))
    gone = sorted(set(calibrated) - set(active))
    restore = f"restore {', '.join(gone)} ('rsx generator restore NAME'), then " if gone else ""
    return (
        f"to use it, {restore}query with exactly its candidates (--candidates {names}) or make"
        f" them the lab's default ('rsx config set default_candidates {names}'); or calibrate"
        f" this set ('{calibrate}')"
    )


def _resyntheses_reason(stored: StoredCalibration, resyntheses: Mapping[str, int]) -> str | None:
    """Why a calibration made with other resyntheses per generator (K) does not apply."""
    calibrated = stored.settings.get("resyntheses") or {}
    changed = sorted(g for g in resyntheses if calibrated.get(g) != resyntheses[g])
    if not changed:
        return None
    parts = ", ".join(f"{g} {calibrated.get(g)} (now {resyntheses[g]})" for g in changed)
    return f"calibrated with other resyntheses per caption: {parts}"


def apply(choice: QueryCalibration | None, result: QueryResult) -> QueryResult:
    """The answer with its prediction set, coverage and calibrated scores, or with the reason
    the calibration is not used (``calibration_note``): a new answer, ``result`` unchanged. The
    same answer without a calibration, and for an answer of another method: prediction sets are
    calibrated on resynthesis answers, and a fused answer says where its own weights came from
    (``fusion``), so a note about the resynthesis calibration would only mislead it."""
    if choice is None or result.method != conformal.METHOD:
        return result
    calibration = choice.calibration
    if calibration is None:
        return dataclasses.replace(result, calibration_note=choice.note)
    lacking = sorted(
        set(result.without_resynthesis)
        | set(calibration.generators) - {entry.generator for entry in result.ranking}
    )
    if lacking:
        note = not_used(
            choice.calibration_id,
            f"no resynthesis of this caption by {', '.join(lacking)}, so the set cannot be"
            " computed",
        )
        return dataclasses.replace(result, calibration_note=note)
    if result.not_generated:  # fewer resyntheses than the K the references were scored with
        note = not_used(
            choice.calibration_id,
            f"not every resynthesis of this caption by {', '.join(result.not_generated)} was"
            " made (--no-generate), and the calibration scored K of each",
        )
        return dataclasses.replace(result, calibration_note=note)
    distances = {entry.generator: entry.distance for entry in result.ranking}
    chosen = calibration.prediction_set(distances)
    scores = softmax_scores([entry.distance for entry in result.ranking], calibration.temperature)
    ranking = [
        dataclasses.replace(entry, score=score)
        for entry, score in zip(result.ranking, scores, strict=True)
    ]
    meaning = set_meaning(chosen, calibration.coverage)
    return dataclasses.replace(
        result,
        ranking=ranking,
        prediction_set=chosen,
        coverage=calibration.coverage,
        calibration_id=choice.calibration_id,
        calibration_note=None,
        temperature=calibration.temperature,
        score_meaning=calibrated_score_meaning(
            calibration.temperature, choice.references, choice.calibration_id
        ),
        verdict_reason=_with_set(result.verdict_reason, meaning),
    )


def _with_set(reason: str, meaning: str) -> str:
    """A verdict's reason with the prediction set in place of the closed-set note: the set says
    how far the evidence narrows the candidates, which the note only warned of."""
    closed = f"; {CLOSED_SET_NOTE}"
    if reason.endswith(closed):
        return reason[: -len(closed)] + f"; prediction set: {meaning}"
    return reason
