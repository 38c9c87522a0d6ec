"""Which stored calibration a query looks at (``store.calibrations.calibration_for``): the newest
active one of the call's candidate set, else the newest active one of any set (the query then
says why it is not used), never a superseded one or one of another method. One statement does it;
these tests hold it to what the two lookups it replaced answered."""

from __future__ import annotations

import pytest

from resynth_index.store import calibrations
from resynth_index.store.engine import make_sessionmaker


@pytest.fixture
def sessions(head_engine):
    return make_sessionmaker(head_engine)


def save(sessions, candidates: list[str], method: str = "resynthesis") -> int:
    with sessions.begin() as session:
        saved, _ = calibrations.save_calibration(
            session, method=method, coverage=0.9, per_generator=False, candidates=candidates,
            embedder_fingerprint="e" * 64, record={"made_for": candidates}, settings={},
            summary={},
        )  # fmt: skip
    return saved


def found(sessions, candidates: list[str], method: str = "resynthesis") -> int | None:
    with sessions.begin() as session:
        stored = calibrations.calibration_for(session, candidates, method)
        exact = calibrations.active_calibration(session, candidates, method)
        newest = calibrations.active_calibration(session, None, method)
    assert stored == (exact or newest)  # what the two lookups it replaced said
    return None if stored is None else stored.id


def test_none_without_a_calibration_of_the_method(sessions):
    assert found(sessions, ["a", "b"]) is None
    save(sessions, ["a", "b"], method="fused")
    assert found(sessions, ["a", "b"]) is None


def test_the_sets_own_wins_over_a_newer_one_of_another_set(sessions):
    own = save(sessions, ["b", "a"])
    newer = save(sessions, ["a", "c"])
    assert found(sessions, ["a", "b"]) == own  # the order of the names does not matter
    assert found(sessions, ["c", "a"]) == newer
    assert found(sessions, ["x"]) == newer  # no own one: the newest of any set, to be named


def test_a_superseded_calibration_is_never_the_answer(sessions):
    first = save(sessions, ["a", "b"])
    second = save(sessions, ["a", "b"])  # supersedes the first
    other = save(sessions, ["z"])
    assert first != second
    assert found(sessions, ["a", "b"]) == second
    assert found(sessions, ["y"]) == other
