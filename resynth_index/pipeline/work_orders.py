"""Work orders for imported generators: captions a query needed that the generator still lacks.

A work order goes out as a CSV (``rsx export-prompts``) that people open in a spreadsheet, fill
in and give back to ``rsx ingest`` as a manifest. Captions are untrusted text, and a spreadsheet
runs a cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return as a formula.
Following OWASP's advice on CSV injection, such a cell is written with one ``'`` in front, which
a spreadsheet shows as plain text (``neutralise_cell``). The rule, exactly: a cell whose text,
after any leading ``'``, starts with one of those six characters gets one more ``'`` in front
when written, and loses exactly one when read back from a CSV manifest (``restore_cell``). So
every caption comes back as it went out (``'=x`` goes out as ``''=x``) and hashes the same.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from resynth_index.errors import RsxError
from resynth_index.store import repository

if TYPE_CHECKING:
    from resynth_index.lab import Lab


#: A cell starting with one of these is a formula to a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: The columns of an exported work order: a manifest ``rsx ingest`` reads once ``path`` is filled.
WORK_ORDER_COLUMNS = ("generator", "caption_hash", "caption", "role", "path")


def _formula_like(text: str) -> bool:
    """Whether ``text``, after any leading single quotes, starts with a formula character."""
    return text.lstrip("'").startswith(FORMULA_STARTS)


def neutralise_cell(text: str) -> str:
    """``text`` made inert for a spreadsheet: one more ``'`` in front when it is formula-like."""
    return "'" + text if _formula_like(text) else text


def restore_cell(text: str) -> str:
    """Undo ``neutralise_cell``: a formula-like cell starting with ``'`` loses exactly one.

    Other text is returned unchanged. (A hand-written manifest cell such as ``'=x`` therefore
    reads as ``=x``, which is also what a spreadsheet shows for it.)
    """
    if text.startswith("'") and _formula_like(text):
        return text[1:]
    return text


@dataclass(frozen=True)
class WorkOrder:
    generator: str
    caption_hash: str
    caption: str


def write_work_orders(orders: Iterable[WorkOrder], handle: TextIO) -> int:
    """Write ``orders`` as a work-order CSV, every cell neutralised; the number written."""
    writer = csv.writer(handle)
    writer.writerow(WORK_ORDER_COLUMNS)
    count = 0
    for order in orders:
        cells = (order.generator, order.caption_hash, order.caption, "resynthesis", "")
        writer.writerow([neutralise_cell(cell) for cell in cells])
        count += 1
    return count


def pending_work(lab: Lab, generator: str | None = None) -> list[WorkOrder]:
    """Every (imported generator, caption) still without a resynthesis, oldest first."""
    with lab.session() as session:
        if generator is not None:
            row = repository.generator_by_name(session, generator)
            if row is None:
                raise RsxError(f"no generator named {generator!r} in this lab")
            if row.kind != "imported":
                raise RsxError(
                    f"{generator!r} is not an imported generator; rsx generates its images"
                )
        found = repository.unfulfilled_work(session, generator)
    return [WorkOrder(name, digest, text) for name, digest, text in found]
