"""Calibrations (the calibrations table), and the references they are made of.

``rsx calibrate`` saves one row per calibration: prediction sets (method ``resynthesis``) or the
weights of the fused method chosen on the lab's references (method ``fused``; such a row has no
coverage: it is stored as 0). A newer calibration of the same candidate set and method
supersedes the older ones (their ``superseded_by`` names it) but never deletes them: an answer
cites the calibration it used by id, so every one stays readable for audit. Queries use the
newest active (not superseded) calibration of their candidate set and method.

This module stores plain JSON-able values; what a record means (``Calibration``) is the
pipeline's business (``pipeline/conformal.py``, ``pipeline/calibrated.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

from sqlalchemy import bindparam, case, select, update
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

    Returns (its id, the ids it superseded). Only older rows are superseded, so of two
    calibrations saved at once the newer one stays active.
    """
    key = candidates_key(candidates)
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
    older = list(
        session.scalars(
            select(CalibrationRow.id).where(
                CalibrationRow.candidates_json == key,
                CalibrationRow.method == method,
                CalibrationRow.superseded_by.is_(None),
                CalibrationRow.id < row.id,
            )
        )
    )
    if older:
        session.execute(
            update(CalibrationRow).where(CalibrationRow.id.in_(older)).values(superseded_by=row.id)
        )
    return row.id, older


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
