"""The audit of queries: one row per answer, enough to reproduce and defend it (the queries table).

Principle 7 of DESIGN.md: a query records the image hash, the caption and its source, the
candidates, the model fingerprints, every distance and the verdict. The stored ``result_json`` is
the answer exactly as reported, its ``query_id`` included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

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
    row = QueryRow(
        created_at=utcnow(),
        image_sha256=answer["sha256"],
        image_path=answer["image"],
        caption_hash=caption_hash,
        caption_source=answer["caption_source"],
        candidates_json=json.dumps(answer["candidates"]),
        fingerprints_json=json.dumps(answer["fingerprints"], sort_keys=True),
        distances_json=json.dumps(distances, sort_keys=True),
        verdict=answer["verdict"],
        result_json="{}",  # replaced below, in the same transaction, once the id is known
    )
    session.add(row)
    session.flush()
    answer["query_id"] = row.id
    row.result_json = json.dumps(answer, sort_keys=True)
    session.flush()
    return row.id


def captions_asked(session: Session) -> dict[str, str]:
    """Every caption a query has asked about: caption hash -> text, oldest question first."""
    rows = session.execute(
        select(CaptionRow.hash, CaptionRow.text)
        .join(QueryRow, QueryRow.caption_hash == CaptionRow.hash)
        .group_by(CaptionRow.hash, CaptionRow.text)
        .order_by(func.min(QueryRow.id))
    )
    return {digest: text for digest, text in rows}
