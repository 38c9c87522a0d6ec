"""Calibrated answers: prediction sets from a lab's stored calibration, and making one.

``rsx calibrate`` scores the lab's references of known generator exactly as ``rsx query``
scores a query (the caption's stored resyntheses by every candidate, K per runnable generator,
the lab's distance and aggregation), fits the softmax temperature on them, computes the
conformal threshold(s) (``pipeline/conformal.py``) and saves the calibration in the lab
(``store/calibrations.py``). A reference takes part only when its caption has resyntheses by
every candidate (all K seeds of a runnable one, at least one supplied image of an imported one)
and its image is not itself one of them.

``rsx query`` then looks up the newest active calibration of its candidate set
(``for_query``) and applies it to each answer (``apply``): the answer gains its prediction set,
the coverage and the calibration's id, and its scores use the fitted temperature. A calibration
made with other models or settings than the query's is not used, and the answer says why in
``calibration_note``: another embedder, another candidate set (a generator added, retired or
left out), a generator whose fingerprint changed, another distance or aggregation, another
number of resyntheses per generator, or a candidate with no resynthesis of the query's caption
(an imported one still pending, a runnable one skipped by ``--no-generate``): the set is over
every calibrated candidate, so without a candidate's distance it cannot be computed. A runnable
candidate with only some of its K resyntheses (``--no-generate``) is not scored as the
references were, so the calibration is not used either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from resynth_index.errors import RsxError
from resynth_index.pipeline import conformal
from resynth_index.pipeline.attribution import (
    CLOSED_SET_NOTE,
    aggregate,
    similarity_to_distance,
    softmax_scores,
)
from resynth_index.pipeline.intake import ensure_embeddings
from resynth_index.pipeline.resynthesis import (
    ResynthesisPlan,
    generate_missing,
    plan_resyntheses,
)
from resynth_index.store import calibrations, embeddings, repository
from resynth_index.store.calibrations import CalibrationReference, StoredCalibration
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    from resynth_index.lab import Lab
    from resynth_index.pipeline.query import QueryResult

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


# ----------------------------------------------------------------------------- making one
@dataclass
class ReferenceSet:
    """The references a calibration can use, found without writing anything.

    ``generators`` are the candidates (sorted by name); ``references`` the usable ones, each
    with resyntheses of its caption by every candidate (or, with ``generate``, missing ones a
    runnable candidate will make); ``notes`` say what was left out and why.
    """

    generators: list[GeneratorRow]
    references: list[CalibrationReference]
    plan: ResynthesisPlan
    caption_texts: dict[str, str]
    generate: bool
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [row.name for row in self.generators]

    def counts(self) -> dict[str, int]:
        """Usable references per candidate (0 for a candidate without any)."""
        by_id = {row.id: row.name for row in self.generators}
        out = dict.fromkeys(self.names, 0)
        for ref in self.references:
            out[by_id[ref.generator_id]] += 1
        return out


def check_method(method: str) -> None:
    """Refuse, in one line, a method ``rsx calibrate`` cannot calibrate."""
    if method in METHODS:
        return
    raise RsxError(f"unknown method {method!r}: 'rsx calibrate' supports {', '.join(METHODS)}")


def find_references(
    lab: Lab, generators: Sequence[GeneratorRow], *, generate: bool = False
) -> ReferenceSet:
    """The candidates' captioned references whose captions have resyntheses by every candidate.

    Reads only. With ``generate``, a runnable candidate's missing resyntheses count as
    available (``reference_distances`` makes them).
    """
    rows = sorted(generators, key=lambda row: row.name)
    if len(rows) < 2:
        raise RsxError("calibration needs at least two candidates: a set of one says nothing")
    with lab.session() as session:
        refs, uncaptioned = calibrations.captioned_references(session, [row.id for row in rows])
        texts = repository.caption_texts(session, list({r.caption_hash for r in refs}))
    plan = plan_resyntheses(lab, [r.caption_hash for r in refs], rows)
    missing = {(caption, name) for name, work in plan.missing.items() for caption, _seed in work}
    notes: list[str] = []
    if uncaptioned:
        notes.append(f"{uncaptioned} reference(s) without a caption left out")
    usable: list[CalibrationReference] = []
    lacking: dict[str, int] = {}
    left_out = copies = 0
    for ref in refs:
        absent = [
            row.name
            for row in rows
            if not _available(row, ref.caption_hash, plan, missing, generate)
        ]
        if absent:
            left_out += 1
            for name in absent:
                lacking[name] = lacking.get(name, 0) + 1
            continue
        if any(ref.image_id in plan.stored.get((ref.caption_hash, n), []) for n in plan.wanted):
            copies += 1
            continue
        usable.append(ref)
    if lacking:
        detail = ", ".join(f"{name} ({count})" for name, count in sorted(lacking.items()))
        hint = "" if generate else " (--generate makes the runnable candidates' missing ones)"
        notes.append(
            f"{left_out} reference(s) left out: their caption lacks resyntheses by {detail}{hint}"
        )
    if copies:
        notes.append(f"{copies} reference(s) left out: the image is itself a stored resynthesis")
    return ReferenceSet(
        generators=rows,
        references=usable,
        plan=plan,
        caption_texts=texts,
        generate=generate,
        notes=notes,
    )


def _available(
    row: GeneratorRow,
    caption_hash: str,
    plan: ResynthesisPlan,
    missing: set[tuple[str, str]],
    generate: bool,
) -> bool:
    """Whether a query of this caption would be compared with ``row``'s resyntheses as usual:
    an imported candidate needs one supplied image, a runnable one all K (or ``generate``)."""
    if row.kind == "imported":
        return bool(plan.stored.get((caption_hash, row.name)))
    return generate or (caption_hash, row.name) not in missing


def check_enough(references: ReferenceSet, coverage: float, per_generator: bool) -> None:
    """Refuse, in one line naming how many are needed, too few references for ``coverage``."""
    needed = conformal.references_needed(coverage)
    counts = references.counts()
    at = level(coverage)
    why = "".join(f"; {note}" for note in references.notes)  # what was left out, if anything
    if per_generator:
        short = {name: n for name, n in counts.items() if n < needed}
        if short:
            have = ", ".join(f"{name} has {n}" for name, n in short.items())
            raise RsxError(
                f"{at} coverage per generator needs at least {needed} usable references of each"
                f" candidate; {have} (a usable reference's caption has resyntheses by every"
                f" candidate): ingest more references or lower --coverage{why}"
            )
        return
    total = sum(counts.values())
    if total < needed:
        raise RsxError(
            f"{at} coverage needs at least {needed} usable references of the candidates;"
            f" the lab has {total} (a usable reference's caption has resyntheses by every"
            f" candidate): ingest more references or lower --coverage{why}"
        )


def reference_distances(
    lab: Lab, references: ReferenceSet, echo: Callable[[str], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(n, C) aggregated distance of each usable reference to each candidate, and (n,) the
    column of its true generator. Generates what ``generate`` allowed, embeds what is missing."""
    rows = references.generators
    names = references.names
    captions = list(dict.fromkeys(r.caption_hash for r in references.references))
    plan = references.plan
    if references.generate:
        plan = plan_resyntheses(lab, captions, rows)  # only the usable references' captions
        if plan.missing_count():
            if echo:
                echo(f"generating {plan.missing_count()} missing resynthes(es)")
            texts = {c: references.caption_texts[c] for c in captions}
            generate_missing(lab, plan, rows, texts)
    ids = [r.image_id for r in references.references]
    ids += [i for c in captions for n in names for i in plan.stored.get((c, n), [])]
    ensure_embeddings(lab, dict.fromkeys(ids))
    with lab.session() as session:
        vectors = embeddings.vectors_by_image_id(session, list(dict.fromkeys(ids)), lab.fingerprint)
    settings = lab.settings
    by_id = {row.id: column for column, row in enumerate(rows)}
    out = np.zeros((len(references.references), len(names)))
    for i, ref in enumerate(references.references):
        query = vectors[ref.image_id].astype(np.float64)
        for c, name in enumerate(names):
            values = [
                similarity_to_distance(
                    float(np.dot(query, vectors[j].astype(np.float64))), settings.distance
                )
                for j in plan.stored[(ref.caption_hash, name)]
            ]
            out[i, c] = aggregate(values, settings.aggregation)
    labels = np.array([by_id[r.generator_id] for r in references.references], dtype=int)
    return out, labels


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
    generate: bool = False,
    echo: Callable[[str], None] | None = None,
) -> CalibrationOutcome:
    """Calibrate prediction sets for this candidate set on the lab's references, and save it.

    Every refusal (method, coverage, too few references) comes before anything is written.
    """
    check_method(method)
    if method != conformal.METHOD:
        raise RsxError(f"--method {method} is calibrated by pipeline.fusion_lab.calibrate_fusion")
    conformal.references_needed(coverage)  # validates the coverage
    found = find_references(lab, generators, generate=generate)
    check_enough(found, coverage, per_generator)
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
    newest active calibration of any candidate set is named with the reason it does not apply.
    None when the lab has no calibration at all (today's answers, unchanged).
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
    if reason is None:
        reason = _resyntheses_reason(stored, resyntheses)
    if reason is not None:
        return QueryCalibration(stored.id, None, note=not_used(stored.id, reason))
    return QueryCalibration(stored.id, calibration, references=len(calibration.reference_ids))


def _resyntheses_reason(stored: StoredCalibration, resyntheses: Mapping[str, int]) -> str | None:
    """Why a calibration made with other resyntheses per generator (K) does not apply."""
    calibrated = stored.settings.get("resyntheses") or {}
    changed = sorted(g for g in resyntheses if calibrated.get(g) != resyntheses[g])
    if not changed:
        return None
    parts = ", ".join(f"{g} {calibrated.get(g)} (now {resyntheses[g]})" for g in changed)
    return f"calibrated with other resyntheses per caption: {parts}"


def apply(choice: QueryCalibration | None, result: QueryResult) -> None:
    """Give one answer its prediction set, coverage and calibrated scores, or the reason the
    calibration is not used (``calibration_note``). Nothing changes without a calibration."""
    if choice is None:
        return
    calibration = choice.calibration
    if calibration is None:
        result.calibration_note = choice.note
        return
    method = getattr(result, "method", conformal.METHOD)  # an answer by another method
    if method != calibration.method:
        result.calibration_note = not_used(
            choice.calibration_id, f"calibrated for {calibration.method}, not {method}"
        )
        return
    lacking = sorted(
        set(result.without_resynthesis)
        | set(calibration.generators) - {entry.generator for entry in result.ranking}
    )
    if lacking:
        result.calibration_note = not_used(
            choice.calibration_id,
            f"no resynthesis of this caption by {', '.join(lacking)}, so the set cannot be"
            " computed",
        )
        return
    if result.not_generated:  # fewer resyntheses than the K the references were scored with
        result.calibration_note = not_used(
            choice.calibration_id,
            f"not every resynthesis of this caption by {', '.join(result.not_generated)} was"
            " made (--no-generate), and the calibration scored K of each",
        )
        return
    distances = {entry.generator: entry.distance for entry in result.ranking}
    chosen = calibration.prediction_set(distances)
    scores = softmax_scores([entry.distance for entry in result.ranking], calibration.temperature)
    for entry, score in zip(result.ranking, scores, strict=True):
        entry.score = score
    meaning = set_meaning(chosen, calibration.coverage)
    result.prediction_set = chosen
    result.coverage = calibration.coverage
    result.calibration_id = choice.calibration_id
    result.calibration_note = None
    result.temperature = calibration.temperature
    result.score_meaning = calibrated_score_meaning(
        calibration.temperature, choice.references, choice.calibration_id
    )
    closed = f"; {CLOSED_SET_NOTE}"
    if result.verdict_reason.endswith(closed):
        result.verdict_reason = (
            result.verdict_reason[: -len(closed)] + f"; prediction set: {meaning}"
        )
