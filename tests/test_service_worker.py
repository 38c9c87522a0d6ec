"""The model worker in process, on a toy lab: its bounds, its failures, its two lanes.

A full queue refuses with a retry estimate; a job that waited past its TTL fails (503) and its
upload is deleted; the pixel budget splits a batch; a bug while answering ends that batch's jobs
(500) and the worker goes on; a lane killed outright is restarted (``health()`` says so
meanwhile); ``stop`` returns within its timeout with every job ended; and a cached query is
answered while a generation batch is held. Every wait is on an event with a generous deadline,
never a sleep.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from pathlib import Path

import pytest

from resynth_index.service import jobs as jobs_module
from resynth_index.service.jobs import JobBoard, QueryJob
from resynth_index.service.worker import QueryWorker, ServiceBusy, ServiceClosing

WAIT_S = 300.0  # a deadline for events, generous for a loaded 2-core machine
TOY_A = ("toy-a",)
CACHED = "a lighthouse at dusk"


@pytest.fixture
def image(make_toy_image) -> Path:
    """A query image made by toy-a."""
    return make_toy_image("toy-a", CACHED)


@pytest.fixture
def cached_lab(toy_lab: Path, image: Path) -> Path:
    """The toy lab with toy-a's one resynthesis (K=1) of ``CACHED`` already stored."""
    from resynth_index.lab import Lab
    from resynth_index.pipeline.query import run_queries

    with Lab.open(toy_lab) as lab:
        run_queries(lab, [image], caption=CACHED, candidates=list(TOY_A), resyntheses=1)
    return toy_lab


@pytest.fixture
def stopped():
    """Workers made by a test, stopped after it whatever happened."""
    made: list[QueryWorker] = []
    yield made
    for worker in made:
        worker.stop(timeout=WAIT_S)


@pytest.fixture
def held_generation(monkeypatch):
    """The toy generators' ``generate()`` blocks until ``release`` is set; ``entered`` is set
    when a call begins. Released after the test whatever happened."""
    from resynth_index.models.generators.diffusers import DiffusersGenerator

    entered, release = threading.Event(), threading.Event()
    original = DiffusersGenerator.generate

    def held(self, requests, *args, **kwargs):
        entered.set()
        assert release.wait(WAIT_S), "the test never released generation"
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(DiffusersGenerator, "generate", held)
    yield entered, release
    release.set()


def _worker(lab: Path, made: list[QueryWorker], **options) -> QueryWorker:
    options.setdefault("gather_s", 0.0)
    worker = QueryWorker(lab, **options)
    made.append(worker)
    return worker


def _job(image: Path, caption: str | None, **fields) -> QueryJob:
    """A job over a private copy of ``image`` (the worker deletes its upload)."""
    upload = image.parent / f"upload-{secrets.token_hex(6)}"
    shutil.copyfile(image, upload)
    fields.setdefault("candidates", TOY_A)
    fields.setdefault("resyntheses", 1)
    return QueryJob(upload, "upload:suspect.png", caption, **fields)


def _ended(job: QueryJob) -> threading.Event:
    ended = threading.Event()
    job.add_done_callback(lambda _job: ended.set())
    return ended


def _wait(*events: threading.Event) -> None:
    for event in events:
        assert event.wait(WAIT_S), "a job never ended"


def _record_calls(monkeypatch) -> list[int]:
    """How many images each ``run_queries`` call of the worker answers."""
    from resynth_index.pipeline import query

    calls: list[int] = []
    original = query.run_queries

    def counting(lab, paths, **kwargs):
        calls.append(len(paths))
        return original(lab, paths, **kwargs)

    monkeypatch.setattr(query, "run_queries", counting)
    return calls


# ---------------------------------------------------------------------- the queue's bounds
def test_a_full_queue_refuses_with_a_retry_estimate_and_counts_it(image, tmp_path) -> None:
    worker = QueryWorker(tmp_path / "never-loaded", queue_limit=2)  # not started: jobs wait
    waiting = [_job(image, f"caption {i}") for i in range(2)]
    for job in waiting:
        worker.submit(job)
    extra = _job(image, "one too many")
    with pytest.raises(ServiceBusy) as refused:
        worker.submit(extra)
    assert refused.value.retry_after >= 1
    assert "busy" in str(refused.value)
    stats = worker.stats()
    assert stats["refused_busy"] == 1 and stats["queued"] == 2 and stats["queue_limit"] == 2
    # a job past its TTL makes room instead of a refusal
    worker.job_ttl_s = 60.0
    waiting[0].queued_at -= 120.0
    worker.submit(extra)
    assert waiting[0].status == 503 and "waited more than 60 s" in (waiting[0].error or "")
    assert not waiting[0].path.exists()
    assert worker.stats()["expired"] == 1 and worker.stats()["queued"] == 2
    # stopped before it ever started: what waits fails at once, and nothing more is taken
    began = time.monotonic()
    worker.stop(timeout=5.0)
    assert time.monotonic() - began < 5.0
    for job in (waiting[1], extra):
        assert (job.state, job.status, job.error) == ("failed", 503, "the service is shutting down")
        assert not job.path.exists()
    with pytest.raises(ServiceClosing):
        worker.submit(_job(image, "after the stop"))


def test_a_job_that_waited_past_its_ttl_fails_and_its_upload_is_deleted(
    toy_lab, image, stopped
) -> None:
    worker = _worker(toy_lab, stopped, job_ttl_s=30.0)
    stale = _job(image, "asked long ago", generate=False)
    stale.queued_at -= 60.0
    fresh = _job(image, "asked now", generate=False)
    ends = [_ended(stale), _ended(fresh)]
    worker.submit(stale)
    worker.submit(fresh)
    worker.start()
    _wait(*ends)
    assert (stale.state, stale.status) == ("failed", 503)
    assert stale.error == (
        "the query waited more than 30 s without a free worker; it was not answered"
    )
    assert not stale.path.exists()
    assert fresh.state == "done", fresh.error
    assert worker.stats()["expired"] == 1


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "one-lane"])
def test_the_pixel_budget_splits_a_batch(toy_lab, image, stopped, monkeypatch, fast_lane) -> None:
    calls = _record_calls(monkeypatch)
    worker = _worker(toy_lab, stopped, batch_pixels=100, fast_lane=fast_lane)
    # 60 + 30 fit; the next 60 waits for the next batch; 500 alone is over budget yet runs alone
    sizes = [60, 30, 60, 500, 10]
    asked = [_job(image, f"scene {i}", generate=False, pixels=n) for i, n in enumerate(sizes)]
    ends = [_ended(job) for job in asked]
    for job in asked:
        worker.submit(job)
    worker.start()
    _wait(*ends)
    assert [job.state for job in asked] == ["done"] * len(asked), [j.error for j in asked]
    assert calls == [2, 1, 1, 1]
    assert worker.stats()["batch_pixels"] == 100


# ---------------------------------------------------------------------- failures
def test_a_bug_while_answering_fails_that_batch_and_the_worker_goes_on(
    toy_lab, image, stopped, monkeypatch
) -> None:
    from resynth_index.pipeline import query

    broken = {"now": False, "calls": 0}
    run_queries, to_json = query.run_queries, query.QueryResult.to_json

    def run_then_break(*args, **kwargs):
        broken["now"] = False  # the audit rows are written as usual
        results = run_queries(*args, **kwargs)
        broken["calls"] += 1
        broken["now"] = broken["calls"] == 1  # the worker's serialisation of the first batch
        return results

    def serialise(self):
        if broken["now"]:
            raise RuntimeError("cannot serialise")
        return to_json(self)

    monkeypatch.setattr(query, "run_queries", run_then_break)
    monkeypatch.setattr(query.QueryResult, "to_json", serialise)
    worker = _worker(toy_lab, stopped)
    first = [_job(image, "first batch", generate=False) for _ in range(2)]
    ends = [_ended(job) for job in first]
    for job in first:
        worker.submit(job)
    worker.start()
    _wait(*ends)
    for job in first:
        assert (job.state, job.status) == ("failed", 500)
        assert job.error == "internal error (RuntimeError); see the log"
        assert not job.path.exists()
    after = _job(image, "the next query", generate=False)
    ended = _ended(after)
    worker.submit(after)
    _wait(ended)
    assert after.state == "done", after.error
    assert worker.health() == (True, None)
    assert worker.stats()["failed"] == 2 and worker.stats()["answered"] == 1


class _Killed(BaseException):
    """What kills a lane's thread in the test (not an Exception: nothing catches it on the way)."""


@pytest.mark.parametrize("where", ["_route", "_answer"])
def test_a_dead_lane_is_restarted_and_the_next_job_answered(
    toy_lab, image, stopped, monkeypatch, where
) -> None:
    """The lane's thread is killed while it routes the job, or while it answers it."""
    reloading, may_reload = threading.Event(), threading.Event()
    loads = []
    load = QueryWorker._load

    def counted_load(self):
        loads.append(1)
        if len(loads) == 2:
            reloading.set()
            assert may_reload.wait(WAIT_S), "the test never let the worker reload"
        return load(self)

    original = getattr(QueryWorker, where)
    calls = []

    def killing_once(self, *args):
        calls.append(1)
        if len(calls) == 1:
            raise _Killed()
        return original(self, *args)

    monkeypatch.setattr(QueryWorker, "_load", counted_load)
    monkeypatch.setattr(QueryWorker, where, killing_once)
    worker = _worker(toy_lab, stopped)
    victim = _job(image, "the query that kills", generate=False)
    ended = _ended(victim)
    worker.submit(victim)
    worker.start()
    _wait(ended)
    assert (victim.status, victim.error) == (500, "internal error (_Killed); see the log")
    assert not victim.path.exists()
    assert reloading.wait(WAIT_S), "the worker was not restarted"
    healthy, why = worker.health()
    assert not healthy and "restarting" in (why or "") and "_Killed" in (why or "")
    assert worker.stats()["restarts"] == 1
    waiting = _job(image, "asked during the restart", generate=False)
    ended = _ended(waiting)
    worker.submit(waiting)  # accepted while restarting: it waits for the new lanes
    may_reload.set()
    _wait(ended)
    assert waiting.state == "done", waiting.error
    assert worker.health() == (True, None)
    assert len(loads) == 2


def _held_in_generation(lab, stopped, held_generation, job):
    """A started worker of ``lab`` whose generating lane holds ``job`` in generate()."""
    entered, _release = held_generation
    worker = _worker(lab, stopped)
    worker.start()
    worker.submit(job)
    assert entered.wait(WAIT_S), "generation never began"
    return worker


def test_stop_returns_within_its_timeout_and_ends_every_job(
    toy_lab, image, stopped, held_generation
) -> None:
    _entered, release = held_generation
    in_flight = _job(image, "generation held at the stop")
    worker = _held_in_generation(toy_lab, stopped, held_generation, in_flight)
    queued = _job(image, "queued behind the held generation", candidates=("toy-b",))
    worker.submit(queued)
    began = time.monotonic()
    worker.stop(timeout=1.0)
    assert time.monotonic() - began < 30.0  # 1 s, and the little it takes to end the jobs
    for job in (in_flight, queued):
        assert (job.state, job.status, job.error) == ("failed", 503, "the service is shutting down")
        assert not job.path.exists()
    assert worker.health() == (False, "the service is shutting down")
    release.set()
    worker.stop(timeout=WAIT_S)  # the held batch ends; the thread with it
    assert (in_flight.state, in_flight.status) == ("failed", 503)  # never answered twice


# ---------------------------------------------------------------------- the fast lane
def test_a_cached_query_is_answered_while_generation_is_held(
    cached_lab, image, stopped, held_generation
) -> None:
    _entered, release = held_generation
    new = _job(image, "a caption never made before")
    new_ended = _ended(new)
    worker = _held_in_generation(cached_lab, stopped, held_generation, new)
    cached = _job(image, CACHED)  # generation allowed: the store says none is needed
    cached_ended = _ended(cached)
    worker.submit(cached)
    _wait(cached_ended)
    assert new.finished_at is None  # still generating
    assert cached.state == "done", cached.error
    assert cached.answer is not None and cached.answer["generated"] == 0
    assert worker.stats()["fast_answered"] == 1
    release.set()
    _wait(new_ended)
    assert new.state == "done", new.error
    assert new.answer is not None and new.answer["generated"] == 1


def test_a_caption_answered_before_but_no_longer_stored_goes_on_to_generation(
    toy_lab, image, stopped
) -> None:
    """The fast lane takes a caption it answered before as stored without asking; when the
    store says otherwise (here toy-a's settings changed, so its resyntheses are made anew), the
    job is passed on before anything is written, and generated."""
    from resynth_index.lab import Lab

    worker = _worker(toy_lab, stopped)
    worker.start()
    first = _job(image, "a caption whose settings change")
    ended = _ended(first)
    worker.submit(first)
    _wait(ended)
    assert first.state == "done" and first.answer and first.answer["generated"] == 1
    with Lab.open(toy_lab) as lab:
        lab.set_generator_settings("toy-a", changes={"guidance": 4.0})
    again = _job(image, "a caption whose settings change")
    ended = _ended(again)
    worker.submit(again)
    _wait(ended)
    assert again.state == "done", again.error
    assert again.answer is not None and again.answer["generated"] == 1
    stats = worker.stats()
    assert stats["rerouted"] == 1 and stats["fast_answered"] == 0


def test_the_memory_of_warm_captions_is_bounded(image) -> None:
    from resynth_index.service.routing import WarmMemory

    warm = WarmMemory(size=2)
    for i in range(3):
        warm.remember(_job(image, f"caption {i}"))
    assert len(warm) == 2
    assert [warm.knows(_job(image, f"caption {i}")) for i in range(3)] == [False, True, True]


def test_the_job_board_forgets_the_oldest_finished_jobs_past_its_cap(monkeypatch, image) -> None:
    monkeypatch.setattr(jobs_module, "KEEP_AT_MOST", 10)
    board = JobBoard()
    running = _job(image, "still running")
    board.add(running)
    for i in range(20):
        job = _job(image, f"done {i}")
        job.fail(400, "no")
        board.add(job)
    assert len(board) <= 10
    assert board.get(running.id) is running  # a job not finished is never dropped
