"""Calibrations (the calibrations table), and the references they are made of.

``rsx calibrate`` saves one row per calibration: prediction sets (method ``resynthesis``) or the
weights of the fused method chosen on the lab's references (method ``fused``; such a row has no
coverage: it is stored as 0). A newer calibration of the same candidate set and method
supersedes the older ones (their ``superseded_by`` names it) but never deletes them: an answer
cites the calibration it used by id, so every one stays readable for audit. Queries use the
newest active (not superseded) calibration of their candidate set and method.

Saving is atomic per candidate set and method: the insert and the supersede run in one
transaction that holds that pair's lock (``_hold_key``), so two ``rsx calibrate`` of the same
candidates that finish at once, on two machines sharing a PostgreSQL store, are saved one after
the other and exactly one stays active.

This module stores plain JSON-able values; what a record means (``Calibration``) is the
business of ``attribution/calibration/`` and ``pipeline/calibrate.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

from sqlalchemy import bindparam, case, select, text, update
from sqlalchemy.orm import Session

from resynth_index.store.models import CalibrationRow, ReferenceRow, utcnow


@dataclass(frozen=True)
class StoredCalibration:
    """One saved calibration, as plain values (no ORM object)."""

    id: int
    created_at: datetime  # UTC
    method: str
    coverage: float
    per_generator: bool
    candidates: tuple[str, ...]  # sorted
    embedder_fingerprint: str
    record: dict[str, Any]  # Calibration.to_dict()
    settings: dict[str, Any]  # what a query must also match, e.g. {"resyntheses": {name: K}}
    summary: dict[str, Any]  # what rsx calibrate reported
    superseded_by: int | None

    @property
    def active(self) -> bool:
        """True until a newer calibration of the same candidate set supersedes it."""
        return self.superseded_by is None


def candidates_key(candidates: Sequence[str]) -> str:
    """The stored form of a candidate set: its sorted names as JSON (order does not matter)."""
    return json.dumps(sorted(set(candidates)))


def save_calibration(
    session: Session,
    *,
    method: str,
    coverage: float,
    per_generator: bool,
    candidates: Sequence[str],
    embedder_fingerprint: str,
    record: Mapping[str, Any],
    settings: Mapping[str, Any],
    summary: Mapping[str, Any],
) -> tuple[int, list[int]]:
    """Save a calibration; it supersedes the active ones of the same candidate set and method.

    Returns (its id, the ids it superseded). The session's transaction holds the pair's lock
    from before the insert until it ends (``_hold_key``), so of two calibrations of the same
    set saved at once the one saved second supersedes the first: exactly one stays active.
    """
    key = candidates_key(candidates)
    _hold_key(session, method, key)
    row = CalibrationRow(
        created_at=utcnow(),
        method=method,
        coverage=float(coverage),
        per_generator=bool(per_generator),
        candidates_json=key,
        embedder_fingerprint=embedder_fingerprint,
        record_json=json.dumps(record, sort_keys=True),
        settings_json=json.dumps(settings, sort_keys=True),
        summary_json=json.dumps(summary, sort_keys=True),
        superseded_by=None,
    )
    session.add(row)
    session.flush()
    return row.id, _supersede(session, method, key, row.id)


def _hold_key(session: Session, method: str, key: str) -> None:
    """Make the other writers of this (method, candidate set) wait until this transaction ends.

    On PostgreSQL a transaction-level advisory lock on the pair, taken before anything is read
    or written: a second writer waits in it until the first commits, and its statements then
    see the first one's row and supersede it (read committed, PostgreSQL's default, which the
    lab keeps: each statement sees what committed before it began). Without it each inserts its
    row unseen by the other and both stay active. On SQLite the insert that follows begins the
    transaction with BEGIN IMMEDIATE (``store/engine.py``), which holds the database's one
    write lock until the end: writers already queue there, and nothing more is needed.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_ADVISORY_LOCK, {"key": lock_key(method, key)})


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(CAST(:key AS bigint))")


def lock_key(method: str, key: str) -> int:
    """The advisory lock number of a (method, candidate set): 64 bits of a SHA-256, signed as
    PostgreSQL's bigint is, and the same on every machine (unlike Python's ``hash``)."""
    digest = hashlib.sha256(f"rsx calibrations\0{method}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _supersede(session: Session, method: str, key: str, new_id: int) -> list[int]:
    """Mark every other active calibration of the pair superseded by ``new_id``; their ids."""
    older = list(
        session.scalars(
            select(CalibrationRow.id)
            .where(
                CalibrationRow.candidates_json == key,
                CalibrationRow.method == method,
                CalibrationRow.superseded_by.is_(None),
                CalibrationRow.id != new_id,
            )
            .order_by(CalibrationRow.id)
        )
    )
    if older:
        session.execute(
            update(CalibrationRow).where(CalibrationRow.id.in_(older)).values(superseded_by=new_id)
        )
    return older


def active_calibration(
    session: Session, candidates: Sequence[str] | None = None, method: str | None = None
) -> StoredCalibration | None:
    """The newest active calibration of this candidate set (of any set when None) and method
    (any when None), or None."""
    statement = select(CalibrationRow).where(CalibrationRow.superseded_by.is_(None))
    if method is not None:
        statement = statement.where(CalibrationRow.method == method)
    if candidates is not None:
        statement = statement.where(CalibrationRow.candidates_json == candidates_key(candidates))
    row = session.scalars(statement.order_by(CalibrationRow.id.desc()).limit(1)).first()
    return None if row is None else _stored(row)


def calibration_for(
    session: Session, candidates: Sequence[str], method: str
) -> StoredCalibration | None:
    """The newest active calibration of ``method`` for exactly this candidate set, else the
    newest active one of ``method`` for any set (the caller tells which by its ``candidates``),
    else None: what a query asks each time, in one statement built once."""
    row = session.scalars(
        _CALIBRATION_FOR, {"method": method, "key": candidates_key(candidates)}
    ).first()
    return None if row is None else _stored(row)


_CALIBRATION_FOR = (
    select(CalibrationRow)
    .where(
        CalibrationRow.superseded_by.is_(None),
        CalibrationRow.method == bindparam("method"),
    )
    .order_by(
        case((CalibrationRow.candidates_json == bindparam("key"), 0), else_=1),
        CalibrationRow.id.desc(),
    )
    .limit(1)
)


def list_calibrations(session: Session) -> list[StoredCalibration]:
    """Every calibration, newest first."""
    rows = session.scalars(select(CalibrationRow).order_by(CalibrationRow.id.desc()))
    return [_stored(row) for row in rows]


class CalibrationReference(NamedTuple):
    """A reference a calibration can use: its id, image, true generator and caption."""

    id: int
    image_id: int
    generator_id: int
    caption_hash: str


def captioned_references(
    session: Session, generator_ids: Sequence[int]
) -> tuple[list[CalibrationReference], int]:
    """The captioned references of these generators in the order they were recorded, and how
    many of theirs have no caption (a reference without one has nothing to resynthesise)."""
    if not generator_ids:
        return [], 0
    rows = session.execute(
        select(
            ReferenceRow.id,
            ReferenceRow.image_id,
            ReferenceRow.generator_id,
            ReferenceRow.caption_hash,
        )
        .where(ReferenceRow.generator_id.in_(list(generator_ids)))
        .order_by(ReferenceRow.id)
    ).all()
    found = [
        CalibrationReference(ref_id, image_id, generator_id, caption)
        for ref_id, image_id, generator_id, caption in rows
        if caption is not None
    ]
    return found, len(rows) - len(found)


def _stored(row: CalibrationRow) -> StoredCalibration:
    created = row.created_at
    if created.tzinfo is None:  # SQLite hands back the naive UTC time it was given
        created = created.replace(tzinfo=timezone.utc)
    return StoredCalibration(
        id=row.id,
        created_at=created,
        method=row.method,
        coverage=row.coverage,
        per_generator=row.per_generator,
        candidates=tuple(json.loads(row.candidates_json)),
        embedder_fingerprint=row.embedder_fingerprint,
        record=json.loads(row.record_json),
        settings=json.loads(row.settings_json),
        summary=json.loads(row.summary_json),
        superseded_by=row.superseded_by,
    )
