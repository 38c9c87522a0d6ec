"""The lab's references of known generator, as calibrations and the fused method's weights use
them: which are usable, what they lack and how it comes (generated, or delivered), and the
signals measured on them.

A reference takes part only when its caption has resyntheses by every candidate (all K seeds of
a runnable one, at least one supplied image of an imported one) and its image is not itself one
of them. As ``rsx query`` does, the runnable candidates' missing resyntheses of those captions are
made first (unless ``--no-generate``) and the imported candidates' missing ones recorded as work
orders (``prepare_references``); a refusal for too few references says which resyntheses are
missing and how they come.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from resynth_index.attribution.calibration import conformal
from resynth_index.attribution.calibration.sets import level
from resynth_index.attribution.combination import RECONSTRUCTION, RESYNTHESIS
from resynth_index.attribution.evidence.layers import layer_distances, layer_reader, layer_signal
from resynth_index.attribution.evidence.reconstruction import query_reconstruction, scorer_for
from resynth_index.attribution.evidence.resynthesis import distance_matrix
from resynth_index.errors import RsxError
from resynth_index.pipeline.intake import ensure_embeddings
from resynth_index.pipeline.plans import (
    PlannedGenerations,
    ProgressCallback,
    ResynthesisPlan,
    plan_resyntheses,
)
from resynth_index.pipeline.resynthesis import generate_missing, record_pending
from resynth_index.store import calibrations, embeddings, repository
from resynth_index.store.calibrations import CalibrationReference
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    from resynth_index.lab import Lab


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
    queries = [vectors[ref.image_id] for ref in references.references]
    resyntheses = [
        [[vectors[j] for j in plan.stored[(ref.caption_hash, name)]] for name in names]
        for ref in references.references
    ]
    out = distance_matrix(queries, resyntheses, settings.distance, settings.aggregation)
    labels = np.array([by_id[r.generator_id] for r in references.references], dtype=int)
    return out, labels


# ----------------------------------------------------------------------------- signals
def reference_signals(
    lab: Lab,
    found: ReferenceSet,
    layers: Sequence[int],
    echo: Callable[[str], None] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, str], dict[str, str]]:
    """Every fused signal of the usable references: (signal -> (n, C) distances, NaN where
    missing; (n,) true columns; candidates without an autoencoder; block -> fingerprint).

    Measured as ``rsx query`` measures a query (and ``rsx eval`` a reference): the resynthesis
    distance of ``reference_distances``, the reconstruction distance of the query's
    scorer, the ``layer-N`` distances of ``attribution.evidence.layers``.
    """

    rows = found.generators
    names = found.names
    refs = found.references
    reader = layer_reader(lab, layers) if layers else None  # a missing block: refused first
    resynthesis, labels = reference_distances(lab, found, echo)
    signals: dict[str, np.ndarray] = {RESYNTHESIS: resynthesis}
    if echo:
        echo(f"reconstructing {len(refs)} reference(s) through the candidates' autoencoders")
    scorer = scorer_for(lab)
    with lab.session() as session:
        shas = repository.image_sha256s(session, [r.image_id for r in refs])
    recon = np.full((len(refs), len(names)), np.nan)
    batch = lab.settings.embedding_batch_size
    for start in range(0, len(refs), batch):
        chunk = refs[start : start + batch]
        pictures = [(shas[r.image_id], lab.stored_image(r.image_id)) for r in chunk]
        values = query_reconstruction(lab, rows, pictures, scorer)
        for offset, (sha, _picture) in enumerate(pictures):
            for c, name in enumerate(names):
                value = values[sha][name]
                recon[start + offset, c] = np.nan if value is None else value
    signals[RECONSTRUCTION] = recon
    fingerprints: dict[str, str] = {}
    if reader is not None:
        captions = list(dict.fromkeys(r.caption_hash for r in refs))
        plan = plan_resyntheses(lab, captions, rows)  # after any generation
        if echo:
            echo(f"reading references and resyntheses at layer(s) {', '.join(map(str, layers))}")
        found_layers = layer_distances(
            lab,
            reader,
            [r.image_id for r in refs],
            [[plan.stored.get((r.caption_hash, n), []) for n in names] for r in refs],
        )
        for layer, matrix in found_layers.items():
            signals[layer_signal(layer)] = matrix
        fingerprints = {str(layer): fp for layer, fp in reader.fingerprints.items()}
    return signals, labels, dict(scorer.unsupported), fingerprints
