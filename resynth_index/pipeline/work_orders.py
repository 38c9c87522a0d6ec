"""Work orders for imported generators: captions a query needed that the generator still lacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import exists, select

from resynth_index.errors import RsxError
from resynth_index.store.models import (
    CaptionRow,
    GeneratorRow,
    PendingResynthesisRow,
    ResynthesisRow,
)

if TYPE_CHECKING:
    from resynth_index.lab import Lab


@dataclass(frozen=True)
class WorkOrder:
    generator: str
    caption_hash: str
    caption: str


def pending_work(lab: Lab, generator: str | None = None) -> list[WorkOrder]:
    """Every (imported generator, caption) still without a resynthesis, oldest first."""
    fulfilled = (
        exists()
        .where(
            ResynthesisRow.generator_id == PendingResynthesisRow.generator_id,
            ResynthesisRow.caption_hash == PendingResynthesisRow.caption_hash,
        )
        .correlate(PendingResynthesisRow)
    )
    statement = (
        select(GeneratorRow.name, CaptionRow.hash, CaptionRow.text)
        .select_from(PendingResynthesisRow)
        .join(GeneratorRow, GeneratorRow.id == PendingResynthesisRow.generator_id)
        .join(CaptionRow, CaptionRow.hash == PendingResynthesisRow.caption_hash)
        .where(~fulfilled, GeneratorRow.retired_at.is_(None))
        .order_by(PendingResynthesisRow.id)
    )
    with lab.session() as session:
        if generator is not None:
            row = session.scalar(select(GeneratorRow).where(GeneratorRow.name == generator))
            if row is None:
                raise RsxError(f"no generator named {generator!r} in this lab")
            if row.kind != "imported":
                raise RsxError(
                    f"{generator!r} is not an imported generator; rsx generates its images"
                )
            statement = statement.where(GeneratorRow.name == generator)
        return [WorkOrder(name, h, text) for name, h, text in session.execute(statement)]
