"""The audit of queries: one row per answer, enough to reproduce and defend it (the queries table).

Principle 7 of DESIGN.md: a query records the image hash, the caption and its source, the
candidates, the model fingerprints, every distance and the verdict. The stored ``result_json`` is
the answer exactly as reported, its ``query_id`` included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from resynth_index.store.engine import table_of
from resynth_index.store.models import CaptionRow, QueryRow, utcnow


def record_query(
    session: Session,
    *,
    answer: dict[str, Any],
    caption_hash: str,
    distances: Mapping[str, Sequence[float]],
) -> int:
    """Record one answer and return its query id.

    ``answer`` is the answer as reported (``QueryResult.to_json()``): its ``sha256``, ``image``,
    ``caption_source``, ``candidates``, ``fingerprints`` and ``verdict`` fill the row's columns.
    The id exists only once the row is inserted, so the row is flushed first and ``answer`` gets
    its ``query_id`` before it is stored whole in ``result_json``.
    """
    query_id = session.execute(
        _INSERT_QUERY,
        {
            "created_at": utcnow(),
            "image_sha256": answer["sha256"],
            "image_path": answer["image"],
            "caption_hash": caption_hash,
            "caption_source": answer["caption_source"],
            "candidates_json": json.dumps(answer["candidates"]),
            "fingerprints_json": json.dumps(answer["fingerprints"], sort_keys=True),
            "distances_json": json.dumps(distances, sort_keys=True),
            "verdict": answer["verdict"],
            "result_json": "{}",  # replaced below, in the same transaction, once the id is known
        },
    ).scalar_one()
    answer["query_id"] = query_id
    session.execute(
        _ANSWER_OF_QUERY, {"query_id": query_id, "answer": json.dumps(answer, sort_keys=True)}
    )
    return query_id


# built once (every query records its answer), as plain table statements: no ORM flush
_QUERIES = table_of(QueryRow)
_INSERT_QUERY = insert(_QUERIES).returning(_QUERIES.c.id)
_ANSWER_OF_QUERY = (
    update(_QUERIES)
    .where(_QUERIES.c.id == bindparam("query_id"))
    .values(result_json=bindparam("answer"))
)


def captions_asked(session: Session) -> dict[str, str]:
    """Every caption a query has asked about: caption hash -> text, oldest question first."""
    rows = session.execute(
        select(CaptionRow.hash, CaptionRow.text)
        .join(QueryRow, QueryRow.caption_hash == CaptionRow.hash)
        .group_by(CaptionRow.hash, CaptionRow.text)
        .order_by(func.min(QueryRow.id))
    )
    return {digest: text for digest, text in rows}


# ------------------------------------------------------------------------------ reading the audit
@dataclass(frozen=True)
class HistoryFilter:
    """Which audit records to list; every criterion given must hold (None: any).

    ``sha256_prefix``: the start of the image's SHA-256 (lowercase hex, a whole digest included);
    ``verdict``: the verdict exactly (a generator name, or ``unknown`` and its kin);
    ``caption_contains``: text the caption holds, ignoring case.
    """

    sha256_prefix: str | None = None
    verdict: str | None = None
    caption_contains: str | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        """The WHERE conditions over ``queries`` joined with ``captions``."""
        where: list[ColumnElement[bool]] = []
        if self.sha256_prefix:
            prefix = self.sha256_prefix.lower()
            # a range, not LIKE: it uses the index on image_sha256 in SQLite and PostgreSQL alike;
            # every digest starting with the prefix continues with hex digits, all below "g"
            where.append(QueryRow.image_sha256 >= prefix)
            where.append(QueryRow.image_sha256 < prefix + "g")
        if self.verdict is not None:
            where.append(QueryRow.verdict == self.verdict)
        if self.caption_contains:
            where.append(
                func.lower(CaptionRow.text).contains(self.caption_contains.lower(), autoescape=True)
            )
        return where


@dataclass(frozen=True)
class AuditEntry:
    """One audit record as ``rsx history`` lists it (plain values, no ORM object)."""

    query_id: int
    created_at: datetime  # UTC
    image_sha256: str
    image_path: str
    verdict: str
    caption: str
    caption_source: str

    def as_json(self) -> dict[str, Any]:
        """The record in the names ``rsx query --json`` uses, full values (history --json, the
        service's history page)."""
        return {
            "query_id": self.query_id,
            "created_at": self.created_at.isoformat(),
            "sha256": self.image_sha256,
            "image": self.image_path,
            "verdict": self.verdict,
            "caption": self.caption,
            "caption_source": self.caption_source,
        }


def query_history(
    session: Session,
    criteria: HistoryFilter | None = None,
    *,
    limit: int = 20,
    offset: int = 0,
) -> list[AuditEntry]:
    """The audit records matching ``criteria``, newest first (by id: ids only grow), paged."""
    statement = (
        select(
            QueryRow.id,
            QueryRow.created_at,
            QueryRow.image_sha256,
            QueryRow.image_path,
            QueryRow.verdict,
            CaptionRow.text,
            QueryRow.caption_source,
        )
        .join(CaptionRow, CaptionRow.hash == QueryRow.caption_hash)
        .where(*(criteria or HistoryFilter()).conditions())
        .order_by(QueryRow.id.desc())
        .limit(max(limit, 0))
        .offset(max(offset, 0))
    )
    return [
        AuditEntry(
            query_id=row[0],
            created_at=_as_utc(row[1]),
            image_sha256=row[2],
            image_path=row[3],
            verdict=row[4],
            caption=row[5],
            caption_source=row[6],
        )
        for row in session.execute(statement)
    ]


def count_query_history(session: Session, criteria: HistoryFilter | None = None) -> int:
    """How many audit records match ``criteria`` (all of them without)."""
    statement = (
        select(func.count(QueryRow.id))
        .select_from(QueryRow)
        .join(CaptionRow, CaptionRow.hash == QueryRow.caption_hash)
        .where(*(criteria or HistoryFilter()).conditions())
    )
    return int(session.scalar(statement) or 0)


def recorded_answer(session: Session, query_id: int) -> str | None:
    """The answer of audit record ``query_id`` exactly as stored (its ``result_json`` text, the
    line ``rsx query --json`` printed), or None when there is no such record."""
    return session.scalar(select(QueryRow.result_json).where(QueryRow.id == query_id))


def _as_utc(moment: datetime) -> datetime:
    """SQLite hands back the naive UTC time it was given; PostgreSQL an aware one."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment
