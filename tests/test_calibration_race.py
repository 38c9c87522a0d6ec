"""Two calibrations of the same candidates saved at once (two ``rsx calibrate`` finishing
together, on two machines sharing a PostgreSQL store) leave exactly one active, on either engine.

Each writer has its own engine, as two processes would. The first is held with its transaction
open right after its supersede (``calibrations._supersede``, patched to wait on an event); the
second starts only then, so the two saves overlap at the point where, unguarded, each inserts its
row unseen by the other. The first is released once the second is seen waiting (PostgreSQL:
``pg_stat_activity``; SQLite: its write statement begun, behind the first one's write lock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from postgres import wait_until
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from resynth_index.store import calibrations, migrate
from resynth_index.store.engine import make_engine, make_sessionmaker

CANDIDATES = ["toy-a", "toy-b", "toy-c"]
WAIT_S = 60.0


def _save(sessions: sessionmaker[Session], candidates: list[str] = CANDIDATES) -> tuple[int, list]:
    with sessions.begin() as session:
        return calibrations.save_calibration(
            session, method="resynthesis", coverage=0.9, per_generator=False,
            candidates=candidates, embedder_fingerprint="e" * 64, record={}, settings={},
            summary={},
        )  # fmt: skip


@pytest.fixture
def engines(engine_url: str) -> Iterator[list[Engine]]:
    """Two engines on one migrated database: two writers, as two processes would be."""
    made = [make_engine(engine_url) for _ in range(2)]
    migrate.upgrade(made[0])
    yield made
    for engine in made:
        engine.dispose()


class _Held:
    """The first ``_supersede`` call waits, its transaction open, until ``release`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self._real = calibrations._supersede
        self._taken = False
        monkeypatch.setattr(calibrations, "_supersede", self)

    def __call__(self, session: Session, method: str, key: str, new_id: int) -> list[int]:
        superseded = self._real(session, method, key, new_id)
        if not self._taken:  # only the first writer stops; later ones pass straight through
            self._taken = True
            self.reached.set()
            assert self.release.wait(WAIT_S), "the test never released the first writer"
        return superseded


class _Writer(threading.Thread):
    """One save in a thread of its own; its result or its error is kept for the test."""

    def __init__(self, save: Callable[[], tuple[int, list]]) -> None:
        super().__init__(daemon=True)
        self._save = save
        self.result: tuple[int, list] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._save()
        except BaseException as error:  # re-raised by the test, in its own thread
            self.error = error

    @classmethod
    def started(cls, save: Callable[[], tuple[int, list]]) -> _Writer:
        writer = cls(save)
        writer.start()
        return writer

    def outcome(self) -> tuple[int, list]:
        self.join(WAIT_S)
        assert not self.is_alive(), "a writer did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _writing(engine: Engine) -> threading.Event:
    """Set once ``engine`` begins a statement that writes or locks (its INSERT on SQLite, the
    advisory lock on PostgreSQL): from then on it is blocked while another writer holds on."""
    begun = threading.Event()

    @event.listens_for(engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "SELECT PG_ADVISORY")):
            begun.set()

    return begun


def _waiting_on_a_lock(engine: Engine) -> bool:
    """Whether another session of this PostgreSQL database waits on a lock (any kind)."""
    with engine.connect() as connection:
        count = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()
    return bool(count)


def _active(sessions: sessionmaker[Session]) -> list[calibrations.StoredCalibration]:
    with sessions.begin() as session:
        return [c for c in calibrations.list_calibrations(session) if c.active]


@pytest.mark.parametrize("earlier", [False, True], ids=["first-of-its-set", "supersedes-one"])
def test_two_overlapping_saves_leave_exactly_one_active(
    engine_name: str, engines: list[Engine], monkeypatch: pytest.MonkeyPatch, earlier: bool
) -> None:
    first, second = (make_sessionmaker(engine) for engine in engines)
    older = [_save(first)[0]] if earlier else []
    held = _Held(monkeypatch)
    one = _Writer.started(lambda: _save(first))
    assert held.reached.wait(WAIT_S), "the first writer never reached its supersede"
    begun = _writing(engines[1])
    two = _Writer.started(lambda: _save(second))
    if engine_name == "postgresql":
        wait_until(
            lambda: _waiting_on_a_lock(engines[0]) or not two.is_alive(),
            timeout=WAIT_S,
            what="the second writer to wait on the first",
        )
    else:
        assert begun.wait(WAIT_S), "the second writer never began to write"
    two.join(0.5)
    assert two.is_alive(), "the second save finished while the first was still open"
    held.release.set()
    first_id, first_superseded = one.outcome()
    second_id, second_superseded = two.outcome()

    assert first_superseded == older
    assert second_superseded == [first_id]  # saved second, so it superseded the first
    [active] = _active(first)
    assert active.id == second_id and second_id > first_id


def test_other_candidate_sets_do_not_wait(
    postgres_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL the lock is per candidate set and method: a calibration of other candidates
    is saved while one is held open (SQLite has one write lock for the whole database)."""
    database = postgres_server.create_database()
    engines = [make_engine(postgres_server.url(database)) for _ in range(2)]
    held = _Held(monkeypatch)
    try:
        migrate.upgrade(engines[0])
        first, second = (make_sessionmaker(engine) for engine in engines)
        one = _Writer.started(lambda: _save(first))
        assert held.reached.wait(WAIT_S)
        other_id, superseded = _Writer.started(lambda: _save(second, ["toy-a", "toy-b"])).outcome()
        assert superseded == []
        held.release.set()
        first_id, _ = one.outcome()
        assert {c.id for c in _active(first)} == {first_id, other_id}
    finally:
        held.release.set()
        for engine in engines:
            engine.dispose()
        postgres_server.drop_database(database)


def test_the_lock_number_is_a_stable_bigint() -> None:
    key = calibrations.candidates_key(CANDIDATES)
    number = calibrations.lock_key("resynthesis", key)
    assert -(2**63) <= number < 2**63
    assert number == calibrations.lock_key("resynthesis", calibrations.candidates_key(CANDIDATES))
    assert number != calibrations.lock_key("fused", key)
