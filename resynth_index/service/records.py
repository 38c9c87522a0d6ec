"""What the read-only endpoints show, for the JSON API and the pages alike (one implementation).

History and audit records come from the store's audit functions (``store/audit.py``), the
generators as ``rsx generator list --all --json`` lists them, pending work orders and their CSV
from ``pipeline/work_orders.py`` (the code ``rsx export-prompts`` runs), and blobs from the blob
store by a validated SHA-256 only.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resynth_index.pipeline.work_orders import pending_work, write_work_orders
from resynth_index.service.uploads import sniff_media_type
from resynth_index.store import audit

if TYPE_CHECKING:
    from resynth_index.lab import Lab

SHA256_RE = re.compile(r"[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]{1,64}")
MAX_LIMIT = 200
MAX_OFFSET = 100_000


@dataclass(frozen=True)
class HistoryPage:
    """One page of the audit history, newest first."""

    total: int
    limit: int
    offset: int
    q: str
    entries: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "limit": self.limit,
            "offset": self.offset,
            "q": self.q,
            "queries": self.entries,
        }


def history(lab: Lab, q: str = "", *, limit: int = 20, offset: int = 0) -> HistoryPage:
    """Audit records matching ``q`` (a SHA-256 prefix, or text the caption holds), paged.

    Both readings of ``q`` count: ``cafe`` finds images whose hash starts with it and captions
    that mention it. The two filtered lists are merged newest first (ids only grow).
    """
    q = q.strip()
    with lab.session() as session:
        if not q:
            total = audit.count_query_history(session)
            rows = audit.query_history(session, limit=limit, offset=offset)
            return HistoryPage(total, limit, offset, q, [row.as_json() for row in rows])
        by_caption = audit.HistoryFilter(caption_contains=q)
        filters = [by_caption]
        total = audit.count_query_history(session, by_caption)
        if _HEX_RE.fullmatch(q.lower()):
            by_sha = audit.HistoryFilter(sha256_prefix=q.lower())
            both = audit.HistoryFilter(sha256_prefix=q.lower(), caption_contains=q)
            filters.append(by_sha)
            total += audit.count_query_history(session, by_sha)
            total -= audit.count_query_history(session, both)
        merged: dict[int, Any] = {}
        for criteria in filters:
            for row in audit.query_history(session, criteria, limit=offset + limit, offset=0):
                merged[row.query_id] = row
    newest_first = [merged[i] for i in sorted(merged, reverse=True)]
    page = newest_first[offset : offset + limit]
    return HistoryPage(total, limit, offset, q, [row.as_json() for row in page])


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
