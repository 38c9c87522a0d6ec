"""What the read-only endpoints show, for the JSON API and the pages alike (one implementation).

History and audit records come from the store's audit functions (``store/audit.py``), with each
answer's margin and an exact verdict filter as ``rsx history`` has them; the generators as ``rsx
generator list --all --json`` lists them, pending work orders and their CSV from
``pipeline/work_orders.py`` (the code ``rsx export-prompts`` runs), blobs from the blob store by
a validated SHA-256 only, and the query form's candidates with those it ticks (``query_form``).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resynth_index.config import LabSettings
from resynth_index.errors import RsxError
from resynth_index.pipeline.work_orders import pending_work, write_work_orders
from resynth_index.service.uploads import sniff_media_type
from resynth_index.store import audit, calibrations, repository

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from resynth_index.lab import Lab

SHA256_RE = re.compile(r"[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]{1,64}")
MAX_LIMIT = 200
MAX_OFFSET = 100_000


@dataclass(frozen=True)
class HistoryPage:
    """One page of the audit history, newest first. Each entry is ``AuditEntry.as_json`` with
    the answer's ``margin`` (second-best minus best distance; None with one candidate)."""

    total: int
    limit: int
    offset: int
    q: str
    entries: list[dict[str, Any]]
    verdict: str = ""  # only answers with this verdict ("": any)

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "limit": self.limit,
            "offset": self.offset,
            "q": self.q,
            "verdict": self.verdict,
            "queries": self.entries,
        }


def history(
    lab: Lab, q: str = "", *, limit: int = 20, offset: int = 0, verdict: str | None = None
) -> HistoryPage:
    """Audit records matching ``q`` (a SHA-256 prefix, or text the caption holds) and
    ``verdict`` (exactly, as ``rsx history --verdict``; None or "": any), paged.

    Both readings of ``q`` count: ``cafe`` finds images whose hash starts with it and captions
    that mention it. The two filtered lists are merged newest first (ids only grow).
    """
    q = q.strip()
    verdict = (verdict or "").strip()
    only = verdict or None
    with lab.session() as session:
        if not q:
            criteria = audit.HistoryFilter(verdict=only)
            total = audit.count_query_history(session, criteria)
            rows = audit.query_history(session, criteria, limit=limit, offset=offset)
            entries = _with_margins(session, rows)
            return HistoryPage(total, limit, offset, q, entries, verdict)
        by_caption = audit.HistoryFilter(verdict=only, caption_contains=q)
        filters = [by_caption]
        total = audit.count_query_history(session, by_caption)
        if _HEX_RE.fullmatch(q.lower()):
            by_sha = audit.HistoryFilter(sha256_prefix=q.lower(), verdict=only)
            both = audit.HistoryFilter(sha256_prefix=q.lower(), verdict=only, caption_contains=q)
            filters.append(by_sha)
            total += audit.count_query_history(session, by_sha)
            total -= audit.count_query_history(session, both)
        merged: dict[int, Any] = {}
        for criteria in filters:
            for row in audit.query_history(session, criteria, limit=offset + limit, offset=0):
                merged[row.query_id] = row
        newest_first = [merged[i] for i in sorted(merged, reverse=True)]
        entries = _with_margins(session, newest_first[offset : offset + limit])
    return HistoryPage(total, limit, offset, q, entries, verdict)


def _with_margins(session: Session, rows: list[audit.AuditEntry]) -> list[dict[str, Any]]:
    """The entries as JSON, each with its answer's recorded margin."""
    margins = repository.query_margins(session, [row.query_id for row in rows])
    return [{**row.as_json(), "margin": margins.get(row.query_id)} for row in rows]


@dataclass(frozen=True)
class QueryForm:
    """What the query form offers: the active generators, those ticked at first, and a note on
    the calibrated candidate set (None without a calibration).

    A calibration's prediction sets apply only to a query of exactly its candidates, so the
    form ticks the set a page user would otherwise never meet: the lab's default candidates
    when set (what ``rsx query`` asks without ``--candidates``), else the set of the newest
    active calibration of resynthesis answers, else every active generator.
    """

    candidates: list[str]
    checked: list[str]
    calibration_note: str | None = None


def query_form(lab: Lab) -> QueryForm:
    """The query form's candidates, the ones ticked, and what calibrated set exists."""
    from resynth_index.attribution.calibration.conformal import METHOD
    from resynth_index.attribution.calibration.sets import level

    names = [row.name for row in lab.generators()]
    defaults = [n for n in (_settings(lab).default_candidates or []) if n in names]
    with lab.session() as session:
        stored = calibrations.active_calibration(session, method=METHOD)
    calibrated = list(stored.candidates) if stored is not None else []
    usable = bool(calibrated) and set(calibrated) <= set(names)
    checked = defaults or (calibrated if usable else names)
    if stored is None:
        return QueryForm(names, checked)
    what = (
        f"Calibration #{stored.id} ({level(stored.coverage)} coverage) was made for the"
        f" candidates {', '.join(calibrated)}"
    )
    if not usable:
        gone = ", ".join(sorted(set(calibrated) - set(names)))
        note = f"{what}; {gone} is no longer active, so no answer here can use it."
    elif set(checked) == set(calibrated):
        note = f"{what}: with exactly these ticked, the answer gets a prediction set."
    else:
        note = f"{what}: tick exactly these for an answer with a prediction set."
    return QueryForm(names, checked, note)


def _settings(lab: Lab) -> LabSettings:
    """The lab's settings as saved now ('rsx config set' while the service runs included),
    else as the lab was opened with."""
    try:
        return LabSettings.load(lab.root)
    except RsxError:
        return lab.settings


def audit_record(lab: Lab, query_id: int) -> dict[str, Any] | None:
    """The answer of audit record ``query_id`` as stored (what ``rsx query --json`` printed)."""
    with lab.session() as session:
        stored = audit.recorded_answer(session, query_id)
    return None if stored is None else json.loads(stored)


def generators(lab: Lab) -> dict[str, Any]:
    """Every generator as ``rsx generator list --all --json`` prints it, and the pending work
    orders of the imported ones (captions queries needed that they still lack)."""
    records = lab.generator_records(include_retired=True)
    pending = [
        {"generator": o.generator, "caption_hash": o.caption_hash, "caption": o.caption}
        for o in pending_work(lab)
    ]
    return {"generators": records, "pending": pending}


def work_orders_csv(lab: Lab, generator: str | None = None) -> str:
    """The work-order CSV ``rsx export-prompts`` writes (spreadsheet-safe cells)."""
    buffer = io.StringIO(newline="")
    write_work_orders(pending_work(lab, generator), buffer)
    return buffer.getvalue()


def blob_file(lab: Lab, sha256: str) -> tuple[Path, str] | None:
    """A stored image's file and media type, by its SHA-256 (lowercase hex, validated here);
    None when the text is no digest or no such blob is stored."""
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        return None
    path = lab.blobs.path_for(sha256)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    media_type = sniff_media_type(head)
    if media_type is None or not path.is_file():
        return None
    return path, media_type
