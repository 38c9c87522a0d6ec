"""Which resyntheses a set of captions needs, and which are stored already.

A resynthesis is keyed by (generator, caption hash, generation-settings hash, seed). A runnable
generator with K resyntheses per caption needs seeds 0..K-1; whatever of those is stored is
reused, the rest is to be generated (``pipeline/resynthesis.py``). An imported generator cannot
run: any resynthesis supplied for the caption counts, and a caption it lacks becomes a work order.

Generation can run for minutes, so it reports as it goes, through plain callbacks (no terminal
code here): ``ProgressEvent`` says which stage, which generator and how far, and
``PlannedGenerations`` says how much will be generated before the first image is.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from resynth_index.errors import RsxError
from resynth_index.media.captions import caption_hash
from resynth_index.media.text import normalise_caption
from resynth_index.models.generators import factory
from resynth_index.pipeline.work_orders import restore_cell
from resynth_index.store import audit, repository
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    from resynth_index.lab import Lab


Key = tuple[str, str]  # (caption hash, generator name)


@dataclass(frozen=True)
class ProgressEvent:
    """How far a long step has come: ``done`` of ``total`` units of ``stage``.

    Stages: ``load`` (images read and captioned), ``generate`` (resyntheses made and stored by
    ``generator``, reported once before its first batch with ``done`` 0 and then after each batch
    is committed), ``embed`` (images embedded). ``done`` only grows within a stage (and generator).
    """

    stage: str
    done: int
    total: int
    generator: str | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class PlannedGenerations:
    """What a plan will generate: ``total`` images, made by ``generators`` for ``captions``.

    ``resyntheses`` is each of those generators' K (resyntheses per caption); ``stored`` counts
    the resyntheses of those generators and captions that are already stored and will be reused,
    so ``total + stored == sum(K of each generator) * captions``.
    """

    total: int
    generators: tuple[str, ...]
    resyntheses: dict[str, int]
    captions: int
    stored: int


@dataclass
class ResynthesisPlan:
    """Stored resynthesis images per (caption, generator), what is missing, what is pending."""

    stored: dict[Key, list[int]] = field(default_factory=lambda: defaultdict(list))
    missing: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    pending: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    sha256: dict[int, str] = field(default_factory=dict)  # of every stored image in the plan
    wanted: dict[str, int] = field(default_factory=dict)  # generator -> K, resyntheses/caption
    # generator -> the batch it was generated in (filled by generate_missing; "auto" resolved)
    batch_sizes: dict[str, int] = field(default_factory=dict)

    def missing_count(self) -> int:
        """How many resyntheses are still to be generated."""
        return sum(len(v) for v in self.missing.values())

    def planned(self) -> PlannedGenerations:
        """What generating the missing resyntheses amounts to (see ``PlannedGenerations``)."""
        names = tuple(name for name, work in self.missing.items() if work)
        captions = {caption for name in names for caption, _seed in self.missing[name]}
        stored = sum(
            len(self.stored.get((caption, name), ())) for name in names for caption in captions
        )
        return PlannedGenerations(
            total=self.missing_count(),
            generators=names,
            resyntheses={name: self.wanted.get(name, 0) for name in names},
            captions=len(captions),
            stored=stored,
        )


def plan_resyntheses(
    lab: Lab,
    caption_hashes: Sequence[str],
    generators: Sequence[GeneratorRow],
    resyntheses: int | None = None,
) -> ResynthesisPlan:
    """Sort every (caption, candidate) into reused, missing (to generate) or pending (imported)."""
    plan = ResynthesisPlan()
    captions = list(dict.fromkeys(caption_hashes))
    by_id = {row.id: row for row in generators}
    rows: list[repository.StoredResynthesis] = []
    if captions and by_id:  # plain column rows: no ORM objects to build on the warm path
        with lab.session() as session:
            rows = repository.stored_resyntheses(session, captions, list(by_id))
    found: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)  # -> seed -> image id
    settings_hashes = {row.id: lab_settings_hash(lab, row) for row in generators}
    for row in rows:
        if row.settings_hash == settings_hashes[row.generator_id]:
            found[(row.caption_hash, row.generator_id)][row.seed] = row.image_id
            plan.sha256[row.image_id] = row.sha256
    wanted_of = {
        row.id: resyntheses or factory.resyntheses_per_caption(row.settings_json)
        for row in generators
    }
    plan.wanted = {row.name: wanted_of[row.id] for row in generators}
    for caption in captions:
        for generator in generators:
            wanted = wanted_of[generator.id]
            have = found.get((caption, generator.id), {})
            key = (caption, generator.name)
            if generator.kind == "imported":
                plan.stored[key] = [have[s] for s in sorted(have)][:wanted]
                if not have:
                    plan.pending[caption].append(generator.name)
                continue
            for seed in range(wanted):
                if seed in have:
                    plan.stored[key].append(have[seed])
                else:
                    plan.missing[generator.name].append((caption, seed))
    return plan


# ------------------------------------------------------------------ precomputing (rsx resynthesize)
@dataclass
class ResynthesizeSummary:
    captions: int = 0
    generators: list[str] = field(default_factory=list)
    generated: int = 0
    reused: int = 0
    # generator -> images per batch it was generated in ("auto" resolved); empty: none generated
    batch_sizes: dict[str, int] = field(default_factory=dict)


def read_captions_file(path: Path) -> list[str]:
    """Captions from a file: one per line, or a CSV (``.csv``) with a ``caption`` column."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or "caption" not in reader.fieldnames:
                    raise RsxError(f"{path}: a captions CSV needs a 'caption' column")
                texts = [restore_cell(record.get("caption") or "") for record in reader]
        else:
            texts = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RsxError(f"{path}: no such captions file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RsxError(f"{path}: cannot read captions: {error}") from None
    captions = [normalise_caption(t) for t in texts]
    return list(dict.fromkeys(c for c in captions if c))


def pending_captions(lab: Lab) -> dict[str, str]:
    """Every caption a query has asked for: caption hash -> text, oldest first."""
    with lab.session() as session:
        return audit.captions_asked(session)


def runnable_generators(lab: Lab, name: str | None = None) -> list[GeneratorRow]:
    """The active generators the lab can run, or just the one named (which must be one)."""
    active = lab.generators()
    if name is not None:
        chosen = [row for row in active if row.name == name]
        if not chosen:
            raise RsxError(f"no active generator named {name!r}; see 'rsx generator list'")
        if chosen[0].kind == "imported":
            raise RsxError(
                f"{name!r} is an imported generator: rsx cannot run it (see 'rsx export-prompts')"
            )
        return chosen
    runnable = [row for row in active if row.kind != "imported"]
    if not runnable:
        raise RsxError("this lab has no runnable generator; add one with 'rsx generator add'")
    return runnable


def plan_captions(
    lab: Lab, captions: dict[str, str], generators: Sequence[GeneratorRow]
) -> tuple[ResynthesisPlan, ResynthesizeSummary]:
    """Record the captions, then plan their resyntheses: what is stored, what must be made.

    Shared by the local path and the Ray executor, so both plan (and count) the same work.
    """
    with lab.session() as session:
        for digest, text in captions.items():
            repository.ensure_caption(session, digest, text)
    plan = plan_resyntheses(lab, list(captions), generators)
    summary = ResynthesizeSummary(
        captions=len(captions),
        generators=[row.name for row in generators],
        reused=sum(len(v) for v in plan.stored.values()),
        generated=plan.missing_count(),
    )
    return plan, summary


def captions_by_hash(texts: Sequence[str]) -> dict[str, str]:
    """caption hash -> normalised text, for captions given as text."""
    return {caption_hash(text): normalise_caption(text) for text in texts}


def lab_settings_hash(lab: Lab, row: GeneratorRow) -> str:
    """The settings part of ``row``'s resynthesis cache key as this lab runs it."""
    return factory.settings_hash(row.kind, row.settings_json, lab.device)
