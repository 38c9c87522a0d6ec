"""What ``rsx check`` reports: the kinds of problem, each with what mends it, and the report.

The checks themselves compare the database with the blobs and the index, and need the lab
(its embedder, for a repair): they are a stage, ``pipeline/check.py``. Each problem is a
``Finding`` of a kind (``KINDS``), so that a report of thousands of orphan blobs can be summed up
per kind ("33 problems: 32 orphan blobs, index file missing").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Kind:
    """A kind of problem: its plural (None: a statement, said once however many lines explain
    it) and what mends it: ``repair`` is what ``rsx check --repair`` does about it, ``by_hand``
    what a person must do instead (one of the two is set, or neither for a statement whose own
    line says what to do), ``otherwise`` another way to mend it.
    """

    plural: str | None
    repair: str | None = None
    by_hand: str | None = None
    otherwise: str | None = None


ORPHAN = "orphan blob"
STRAY = "stray file"
INDEX_MISSING = "index file missing"
INDEX_UNREADABLE = "index file unreadable"
INDEX_FOREIGN = "index made by another embedder"
INDEX_OUT_OF_STEP = "index out of step with the database"
NOT_EMBEDDED = "image without an embedding"
CORRUPT = "corrupt database"
QUARANTINED = "quarantined blob"
ORPHANS_HELD = "orphan blobs held back"
INDEX_AHEAD = "index ahead of the database"
_RESTORE_DATABASE = (
    "restore the lab's database from a backup (SQLite: lab.sqlite with its -wal file, if one was"
    " saved beside it); the blobs and the index were not touched"
)

#: --reread: a file whose size and times are unchanged is otherwise skipped unread, and its
#: damaged blob with it (see pipeline/unchanged.py)
_REINGEST = "restore the original files and re-ingest them with rsx ingest --reread"

#: Every kind of problem ``rsx check`` reports, in the order a summary names them.
KINDS: dict[str, Kind] = {
    "missing blob": Kind("missing blobs", by_hand=_REINGEST),
    "altered blob": Kind("altered blobs", by_hand=_REINGEST),
    "unreadable blob": Kind("unreadable blobs", by_hand="fix the blob store's permissions or disk"),
    "misrecorded blob": Kind("misrecorded blobs", by_hand=_REINGEST),
    ORPHAN: Kind(
        "orphan blobs",
        repair="moves the orphan blobs to the lab's quarantine",
        otherwise="rerun the interrupted ingest or query: it stores the orphan blobs' rows",
    ),
    ORPHANS_HELD: Kind(None),  # its line says why and what to do
    QUARANTINED: Kind("quarantined blobs", repair="moves them back from quarantine"),
    CORRUPT: Kind(None, by_hand=_RESTORE_DATABASE),
    INDEX_AHEAD: Kind(None),  # its line says what to do
    STRAY: Kind(
        "stray files",
        by_hand="move the stray files out of the blob store (a blob filed in the wrong folder"
        " belongs where its line says)",
    ),
    NOT_EMBEDDED: Kind("images without an embedding", repair="embeds them"),
    "wrong-dimension embedding": Kind(
        "wrong-dimension embeddings", by_hand="these vectors cannot be used: re-create the lab"
    ),
    "image that cannot be embedded": Kind("images that cannot be embedded", by_hand=_REINGEST),
    "no embedder": Kind(None, by_hand="run the repair through the Lab, which has the embedder"),
    INDEX_MISSING: Kind(None, repair="rebuilds the index from the database"),
    INDEX_UNREADABLE: Kind(None, repair="rebuilds the index from the database"),
    INDEX_FOREIGN: Kind(None, repair="rebuilds the index from the database"),
    INDEX_OUT_OF_STEP: Kind(None, repair="rebuilds the index from the database"),
}

#: What ``rsx check`` says about a blob, by what ``BlobStore.verify`` found: (kind, words).
BLOB_PROBLEMS = {
    "missing": ("missing blob", "missing from the blob store"),
    "hash mismatch": ("altered blob", "altered: its bytes no longer match their SHA-256"),
    "unreadable": ("unreadable blob", "unreadable (permissions or a disk error)"),
}


@dataclass(frozen=True)
class Finding:
    """One problem: its kind (a key of ``KINDS``), the line that names it, and how many of its
    kind the line stands for (``"3 image(s) have no embedding"`` stands for 3)."""

    kind: str
    text: str
    count: int = 1

    def __str__(self) -> str:
        return self.text


@dataclass
class CheckReport:
    """Problems found (one line each), what was repaired, what cannot be, and plain notes."""

    problems: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepairable: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not problems: e.g. what a writer is storing
    held: set[str] = field(default_factory=set)  # kinds whose repair is held back (not offered)

    def hold_back(self, kind: str) -> None:
        """Offer no repair of ``kind``: the evidence says a repair would do harm (a problem of
        another kind says why and what to do instead)."""
        self.held.add(kind)

    @property
    def ok(self) -> bool:
        """No problem left: none found, or all repaired."""
        return not self.problems or (not self.unrepairable and bool(self.repaired))

    def problem(self, kind: str, text: str, count: int = 1) -> Finding:
        """Record a problem (and return it)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind of problem {kind!r}")
        finding = Finding(kind, text, count)
        self.problems.append(finding)
        return finding

    def cannot_repair(self, kind: str, text: str, count: int = 1) -> None:
        """Record what rsx cannot mend."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind of problem {kind!r}")
        self.unrepairable.append(Finding(kind, text, count))

    def counts(self) -> dict[str, int]:
        """Problems per kind, in ``KINDS`` order: a statement kind counts once."""
        found: dict[str, int] = {}
        for finding in self.problems:
            found[finding.kind] = found.get(finding.kind, 0) + finding.count
        return {
            kind: (count if KINDS[kind].plural else 1)
            for kind in KINDS
            if (count := found.get(kind, 0))
        }

    def summary(self) -> str:
        """One line: ``"33 problems: 32 orphan blobs, index file missing"`` ("" when none)."""
        counts = self.counts()
        if not counts:
            return ""
        total = sum(counts.values())
        parts = []
        for kind, count in counts.items():
            plural = KINDS[kind].plural
            parts.append(kind if plural is None else f"{count} {kind if count == 1 else plural}")
        return f"{total} problem{'s' if total != 1 else ''}: {', '.join(parts)}"

    def repairs(self) -> list[str]:
        """What ``--repair`` would do (or did) about the problems found, once per distinct step."""
        steps = [KINDS[kind].repair for kind in self.counts() if kind not in self.held]
        return list(dict.fromkeys(step for step in steps if step))

    def otherwise(self) -> list[str]:
        """Other ways to mend the problems found, once per distinct way."""
        ways = [KINDS[kind].otherwise for kind in self.counts() if kind not in self.held]
        return list(dict.fromkeys(way for way in ways if way))

    def unrepairable_count(self) -> int:
        """How many problems rsx cannot mend (counted like ``counts``)."""
        found: dict[str, int] = {}
        for finding in self.unrepairable:
            found[finding.kind] = found.get(finding.kind, 0) + finding.count
        return sum(count if KINDS[kind].plural else 1 for kind, count in found.items())

    def by_hand(self) -> list[str]:
        """What a person must do about the problems rsx cannot mend, once per distinct step."""
        kinds = dict.fromkeys([*self.counts(), *(f.kind for f in self.unrepairable)])
        steps = [KINDS[kind].by_hand for kind in kinds]
        return list(dict.fromkeys(step for step in steps if step))
