"""Calibrated answers: prediction sets from a lab's stored calibration, and making one.

``rsx calibrate`` scores the lab's references of known generator exactly as ``rsx query``
scores a query (the caption's stored resyntheses by every candidate, K per runnable generator,
the lab's distance and aggregation), fits the softmax temperature on them, computes the
conformal threshold(s) (``pipeline/conformal.py``) and saves the calibration in the lab
(``store/calibrations.py``). A reference takes part only when its caption has resyntheses by
every candidate (all K seeds of a runnable one, at least one supplied image of an imported one)
and its image is not itself one of them. As ``rsx query`` does, it first makes the runnable
candidates' missing resyntheses of those captions (unless ``--no-generate``) and records the
imported candidates' missing ones as work orders (``prepare_references``); a refusal for too few
references says which resyntheses are missing and how they come.

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

from collections.abc import Callable, Collection, Mapping, Sequence
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
    PlannedGenerations,
    ProgressCallback,
    ResynthesisPlan,
    generate_missing,
    plan_resyntheses,
    record_pending,
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
    runnable candidate will make). ``lacking`` counts, per candidate, the references left out
    for want of its resyntheses; ``short_of`` those references per kind of candidate lacking
    (``runnable``, ``imported``) and ``left_out`` per true generator. ``notes`` say what was
    left out and why, and what would bring it in.
    """

    generators: list[GeneratorRow]
    references: list[CalibrationReference]
    plan: ResynthesisPlan
    caption_texts: dict[str, str]
    generate: bool
    lacking: dict[str, int] = field(default_factory=dict)
    short_of: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, int] = field(default_factory=dict)
    other_notes: list[str] = field(default_factory=list)  # uncaptioned, copies

    @property
    def names(self) -> list[str]:
        return [row.name for row in self.generators]

    @property
    def notes(self) -> list[str]:
        """What was left out, each with what would bring it in, in one list."""
        return [*self.shortfalls(), *self.other_notes]

    def counts(self) -> dict[str, int]:
        """Usable references per candidate (0 for a candidate without any)."""
        by_id = {row.id: row.name for row in self.generators}
        out = dict.fromkeys(self.names, 0)
        for ref in self.references:
            out[by_id[ref.generator_id]] += 1
        return out

    def shortfalls(self) -> list[str]:
        """One phrase per kind of candidate whose missing resyntheses left references out,
        saying what to do: runnable ones are made without --no-generate, imported ones are
        delivered (their work orders are in 'rsx export-prompts')."""
        kinds = {row.name: _kind(row) for row in self.generators}
        out = []
        for kind, (what, fix) in _SHORTFALLS.items():
            if not self.short_of.get(kind):
                continue
            detail = ", ".join(
                f"{name} ({n})" for name, n in sorted(self.lacking.items()) if kinds[name] == kind
            )
            out.append(
                f"{self.short_of[kind]} reference(s) left out, lacking {what} {detail}: {fix}"
            )
        return out


#: kind of candidate -> (what a reference lacks, by whom; how it comes): see ``shortfalls``.
_SHORTFALLS = {
    "runnable": ("resyntheses of their caption by", "drop --no-generate to make them"),
    "imported": (
        "a resynthesis of their caption by imported",
        "deliver them ('rsx export-prompts' lists the work orders)",
    ),
}


def _kind(row: GeneratorRow) -> str:
    """``imported`` (rsx cannot run it: its resyntheses are delivered) or ``runnable``."""
    return "imported" if row.kind == "imported" else "runnable"


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
    available (``make_missing`` makes them); an imported candidate's never do.
    """
    rows = sorted(generators, key=lambda row: row.name)
    if len(rows) < 2:
        raise RsxError("calibration needs at least two candidates: a set of one says nothing")
    with lab.session() as session:
        refs, uncaptioned = calibrations.captioned_references(session, [row.id for row in rows])
        texts = repository.caption_texts(session, list({r.caption_hash for r in refs}))
    plan = plan_resyntheses(lab, [r.caption_hash for r in refs], rows)
    missing = {(caption, name) for name, work in plan.missing.items() for caption, _seed in work}
    found = ReferenceSet(
        generators=rows, references=[], plan=plan, caption_texts=texts, generate=generate
    )
    if uncaptioned:
        found.other_notes.append(f"{uncaptioned} reference(s) without a caption left out")
    true_name = {row.id: row.name for row in rows}
    copies = 0
    for ref in refs:
        absent = [
            row for row in rows if not _available(row, ref.caption_hash, plan, missing, generate)
        ]
        if absent:
            _count(found.left_out, true_name[ref.generator_id])
            for row in absent:
                _count(found.lacking, row.name)
            for kind in {_kind(row) for row in absent}:
                _count(found.short_of, kind)
            continue
        if any(ref.image_id in plan.stored.get((ref.caption_hash, n), []) for n in plan.wanted):
            copies += 1
            continue
        found.references.append(ref)
    if copies:
        found.other_notes.append(
            f"{copies} reference(s) left out: the image is itself a stored resynthesis"
        )
    return found


def _count(counts: dict[str, int], key: str) -> None:
    """One more of ``key`` in ``counts``."""
    counts[key] = counts.get(key, 0) + 1


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
    """Refuse, in one line naming how many are needed and what is missing, too few references
    for ``coverage``."""
    needed = conformal.references_needed(coverage)
    counts = references.counts()
    at = level(coverage)
    if per_generator:
        short = {name: n for name, n in counts.items() if n < needed}
        if short:
            have = ", ".join(f"{name} has {n}" for name, n in short.items())
            left_out = references.left_out
            within = all(n + left_out.get(name, 0) >= needed for name, n in short.items())
            raise RsxError(
                f"{at} coverage per generator needs at least {needed} usable references of each"
                f" candidate; {have}{_remedy(references, within)}"
            )
        return
    total = sum(counts.values())
    if total < needed:
        within = total + sum(references.left_out.values()) >= needed
        raise RsxError(
            f"{at} coverage needs at least {needed} usable references of the candidates;"
            f" the lab has {total}{_remedy(references, within)}"
        )


def _remedy(references: ReferenceSet, within_reach: bool) -> str:
    """How a refusal for too few references ends: what is missing and what would bring it in
    (``within_reach``: the references left out would be enough once their resyntheses exist),
    else more references; then the lower coverage, and the other notes."""
    fixes = references.shortfalls()
    if fixes:
        more = [] if within_reach else ["ingest more references"]
        text = ": " + "; ".join([*fixes, *more]) + "; or lower --coverage"
    else:
        text = (
            " (a usable reference is captioned and its caption has resyntheses by every"
            " candidate): ingest more references or lower --coverage"
        )
    return text + "".join(f"; {note}" for note in references.other_notes)


def check_usable(references: ReferenceSet, method: str) -> None:
    """Refuse, in one line saying what is missing, a calibration with no usable reference at
    all (``--method fused`` chooses its weights on at least one)."""
    if references.references:
        return
    fixes = references.shortfalls() or [
        "ingest some with role 'reference' (a usable reference is captioned and its caption has"
        " resyntheses by every candidate)"
    ]
    raise RsxError(
        f"--method {method} needs references of the candidates to choose its weights on, and"
        f" the lab has no usable one: {'; '.join(fixes)}"
        + "".join(f"; {note}" for note in references.other_notes)
    )


def prepare_references(
    lab: Lab,
    generators: Sequence[GeneratorRow],
    *,
    generate: bool = True,
    check: Callable[[ReferenceSet], None] | None = None,
    on_plan: Callable[[PlannedGenerations], None] | None = None,
    events: ProgressCallback | None = None,
    echo: Callable[[str], None] | None = None,
) -> ReferenceSet:
    """The usable references with every resynthesis they need stored, as ``rsx query`` would
    leave them: the runnable candidates' missing ones made (``generate``), the imported
    candidates' missing ones recorded as work orders.

    The work orders are written first, as ``rsx query`` writes them, so that a refusal can
    point at 'rsx export-prompts'; then ``check`` may refuse, before anything is generated.
    After generating, the references are found again: a fresh resynthesis can be a reference's
    own image (the same bytes), which is then left out, and ``check`` is asked again.
    """
    found = find_references(lab, generators, generate=generate)
    record_pending(lab, found.plan, found.generators)
    if check is not None:
        check(found)
    if not generate or not make_missing(lab, found, on_plan=on_plan, events=events, echo=echo):
        return found
    found = find_references(lab, generators, generate=generate)
    if check is not None:
        check(found)
    return found


def make_missing(
    lab: Lab,
    references: ReferenceSet,
    *,
    on_plan: Callable[[PlannedGenerations], None] | None = None,
    events: ProgressCallback | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Generate the runnable candidates' missing resyntheses of the usable references'
    captions, batched and stored as ``rsx query`` makes them; how many were made.

    ``on_plan`` is told what will be generated before the first image is, and may raise to
    refuse (nothing is written then); without it ``echo`` says how many. ``events`` gets the
    ``generate`` progress events of ``generate_missing``.
    """
    captions = list(dict.fromkeys(r.caption_hash for r in references.references))
    plan = plan_resyntheses(lab, captions, references.generators)
    if not plan.missing_count():
        return 0
    if on_plan is not None:
        on_plan(plan.planned())
    elif echo is not None:
        echo(f"generating {plan.missing_count()} missing resynthes(es)")
    texts = {c: references.caption_texts[c] for c in captions}
    return len(generate_missing(lab, plan, references.generators, texts, events=events))


def reference_distances(
    lab: Lab, references: ReferenceSet, echo: Callable[[str], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(n, C) aggregated distance of each usable reference to each candidate, and (n,) the
    column of its true generator. Generates what ``generate`` allowed (nothing is left to make
    after ``prepare_references``), embeds what is missing."""
    rows = references.generators
    names = references.names
    captions = list(dict.fromkeys(r.caption_hash for r in references.references))
    plan = references.plan
    if references.generate:
        make_missing(lab, references, echo=echo)
        plan = plan_resyntheses(lab, captions, rows)  # only the usable references' captions
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
        raise RsxError(f"--method {method} is calibrated by pipeline.fusion_lab.calibrate_fusion")
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


def apply(choice: QueryCalibration | None, result: QueryResult) -> None:
    """Give one answer its prediction set, coverage and calibrated scores, or the reason the
    calibration is not used (``calibration_note``). Nothing changes without a calibration, nor
    in an answer of another method: prediction sets are calibrated on resynthesis answers, and
    a fused answer says where its own weights came from (``fusion``), so a note about the
    resynthesis calibration would only mislead it."""
    if choice is None:
        return
    if getattr(result, "method", conformal.METHOD) != conformal.METHOD:
        return  # prediction sets are of resynthesis answers: a fused answer has its own note
    calibration = choice.calibration
    if calibration is None:
        result.calibration_note = choice.note
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
