"""The model worker: threads that own the lab's models and answer queued queries.

**Two lanes.** Every job enters one queue. The *fast lane* (a thread) takes what is waiting and
asks the store which jobs need generation: one with an explicit caption whose resyntheses by its
candidates (K of each) are all stored (``plan_resyntheses``; a caption answered here before is
taken as stored, and checked again when it is answered), or one asked with ``generate=0``, needs
none, and the fast lane answers it at once. The others (a caption not yet made by every
candidate, no caption (the captioner must write one), ``method=fused``) go on to the *generating
lane*, so a cached query never waits behind a generation batch. With ``fast_lane=False`` one
thread answers everything (the generating lane reading the queue itself), as before.

**Batching** (the generating lane). It takes the first job, then what else is waiting (up to
``batch_limit``); when a query may need generation (its caption was never answered here) it also
waits up to ``gather_s`` for more to arrive, so concurrent queries that need the same generator
are made in one generation batch. Jobs that share (candidates, resyntheses, generate, method) go
to one ``run_queries`` call, each with its own caption; that call writes every answer's audit row
in one transaction, so a query is recorded whole or not at all. A query whose caption this worker
has answered before (an LRU of ``WARM_KEYS``) skips the gather window.

**Bounds.** At most ``queue_limit`` jobs wait (not yet started): one more is refused at once with
``ServiceBusy`` and a ``retry_after`` estimate, the time a batch of the generating lane has been
taking (at least 1 s). A job that waits more than ``job_ttl_s`` without being started fails (503)
and its upload is deleted. A batch takes jobs only while the sum of their pixels stays within
``batch_pixels`` (one job over it runs alone); each lane holds one batch, so at most two batches
of decoded images are in memory.

**Failures.** Whatever escapes the answer of a batch, every job of it ends: an ``RsxError`` with
its own line (400, or 500 for the store or a model), anything else with 500 "internal error
(TypeName); see the log" and a traceback in the log (a bug in rsx, never a client's mistake). A
lane whose thread dies (a ``BaseException``) has its batch failed the same way; a supervisor
thread then stops the other lane, reloads the lab and the models, and starts both again
(``restarts``); ``health()`` says so meanwhile, and the queued jobs wait for the new lanes. More
than ``MAX_RESTARTS`` restarts within ``RESTART_WINDOW_S`` end the worker (``failure``).

**The index.** Both lanes share one ``Lab`` (sessions per call, the embedder, the captioner on
the generating lane only, generator models never touched by the fast lane) and the vector index
it holds loaded: a query gathers the vectors it holds from memory and reads the newer ones from
the database. The index is synced (the one write to it) when both lanes have been idle
``IDLE_SYNC_S``, under ``_IndexGate``: never while a lane reads it.

**Stopping.** ``stop`` refuses new jobs, answers and records every job already queued, syncs the
index and ends the threads, for at most its timeout (``STOP_TIMEOUT_S`` by default); past that,
every job not yet answered, queued or in flight, fails with 503, so that when ``stop`` returns
every job ever accepted has ended.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from resynth_index.errors import ModelLoadError, RsxError, StoreError
from resynth_index.service.jobs import JobQueue, QueryJob
from resynth_index.service.routing import (
    GroupProgress,
    NeedsGeneration,
    WarmMemory,
    internal,
    refuse_generation,
    route,
    said,
)

if TYPE_CHECKING:
    from resynth_index.lab import Lab

GATHER_S = 0.03
BATCH_LIMIT = 16
QUEUE_LIMIT = 64
JOB_TTL_S = 600.0
BATCH_PIXELS = 64_000_000
STOP_TIMEOUT_S = 60.0
IDLE_SYNC_S = 2.0
TICK_S = 1.0  # how often the supervisor looks for expired jobs; the longest a lane waits blind
MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0
SHUTTING_DOWN = "the service is shutting down"
LOADING = "loading models"

log = logging.getLogger("rsx.serve.worker")


class ServiceClosing(Exception):
    """The worker no longer takes jobs (it is stopping, or its models failed to load)."""


class ServiceBusy(Exception):
    """The queue is full: ``retry_after`` is how many seconds to wait before asking again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


@dataclass
class _Lane:
    """One lane: its thread, where it takes jobs, and the jobs it holds (for the supervisor to
    end should the thread die)."""

    name: str  # "fast" or "generating"
    queue: JobQueue
    thread: threading.Thread | None = None
    held: list[QueryJob] = field(default_factory=list)
    busy: bool = False
    ended: bool = False
    died_of: BaseException | None = None


class _IndexGate:
    """Queries reading the loaded index against the one thing that writes it, the idle sync:
    a sync runs only while no query reads (it is skipped, not waited for, when one does), and
    a query waits while a sync runs."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._readers = 0
        self._syncing = False

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._changed:
            while self._syncing:
                self._changed.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextmanager
    def syncing_if_free(self) -> Iterator[bool]:
        """Yields True (and holds off readers) when no query reads now, else False at once."""
        with self._changed:
            free = self._readers == 0 and not self._syncing
            self._syncing = self._syncing or free
        try:
            yield free
        finally:
            if free:
                with self._changed:
                    self._syncing = False
                    self._changed.notify_all()


class QueryWorker:
    """Owns one ``Lab`` with its models on ``device`` and answers ``QueryJob``s (module notes).

    ``gather_s``, ``batch_limit``: the generating lane's batching. ``queue_limit``: jobs waiting
    before ``submit`` refuses with ``ServiceBusy``. ``job_ttl_s``: how long a job may wait
    unstarted. ``batch_pixels``: the pixel budget of one batch. ``fast_lane``: answer cached
    queries on their own thread (False: one thread answers all, for comparison).
    """

    def __init__(
        self,
        lab_dir: Path,
        device: str | None = None,
        *,
        gather_s: float = GATHER_S,
        batch_limit: int = BATCH_LIMIT,
        queue_limit: int = QUEUE_LIMIT,
        job_ttl_s: float = JOB_TTL_S,
        batch_pixels: int = BATCH_PIXELS,
        fast_lane: bool = True,
    ) -> None:
        self.lab_dir = Path(lab_dir)
        self.device = device
        self.gather_s = gather_s
        self.batch_limit = max(1, batch_limit)
        self.queue_limit = max(1, queue_limit)
        self.job_ttl_s = job_ttl_s
        self.batch_pixels = max(1, batch_pixels)
        self.fast_lane = fast_lane
        self.ready = threading.Event()  # set while the lanes serve (cleared while restarting)
        self.failure: str | None = None  # why the worker ended for good (the models, restarts)
        self._intake = JobQueue()  # every new job
        self._generating = JobQueue() if fast_lane else self._intake  # what needs generation
        self._accepting = True
        self._submit_lock = threading.Lock()
        self._stopping = threading.Event()
        self._halt = threading.Event()  # the lanes end after their batch (a restart, a timeout)
        self._lane_ended = threading.Event()  # wakes the supervisor
        self._lanes: list[_Lane] = []
        self._supervisor = threading.Thread(
            target=self._supervise, name="rsx-model-supervisor", daemon=True
        )
        self._gate = _IndexGate()
        self._warm = WarmMemory()
        self._stats = {
            "batches": 0,
            "generation_batches": 0,
            "answered": 0,
            "failed": 0,
            "fast_answered": 0,
            "rerouted": 0,  # taken by the fast lane, then found to need generation
            "refused_busy": 0,
            "expired": 0,
            "restarts": 0,
        }
        self._stats_lock = threading.Lock()
        self._state: str = "idle"
        self._reason: str | None = "the model worker has not started"
        self._batch_s: float | None = None  # how long a generating batch takes (moving average)
        self._unsynced = False
        self._last_batch_end = time.monotonic()
        self._captioner: Any = None

    # ------------------------------------------------------------------ the outside
    def start(self) -> None:
        self._set_state("loading", LOADING)
        self._supervisor.start()

    def submit(self, job: QueryJob) -> None:
        """Queue ``job``. ServiceClosing when the worker takes no more; ServiceBusy (with
        ``retry_after``) when ``queue_limit`` jobs already wait."""
        with self._submit_lock:
            if not self._accepting:
                raise ServiceClosing(SHUTTING_DOWN)
            if self.failure is not None:
                raise ServiceClosing(self.health()[1] or self.failure)
            if self._waiting() >= self.queue_limit:
                self._expire_waiting()  # jobs past their time make room first
            waiting = self._waiting()
            if waiting >= self.queue_limit:
                self._count("refused_busy")
                retry = self.retry_after()
                raise ServiceBusy(
                    f"the service is busy: {waiting} queries are waiting; retry in {retry} s",
                    retry,
                )
            self._intake.put(job)

    def retry_after(self) -> int:
        """When to ask again after a refusal (s): how long a generating batch has been taking,
        at least 1, at most the job TTL."""
        with self._stats_lock:
            batch_s = self._batch_s if self._batch_s is not None else 1.0
        return max(1, math.ceil(min(batch_s, max(self.job_ttl_s, 1.0))))

    def health(self) -> tuple[bool, str | None]:
        """(True, None) while the lanes serve; else (False, why): "loading models", restarting
        after a lane died, the models could not be loaded, shutting down."""
        with self._stats_lock:
            state, reason = self._state, self._reason
        return (True, None) if state == "ready" else (False, reason)

    def stop(self, timeout: float | None = STOP_TIMEOUT_S) -> None:
        """Take no more jobs, answer the queued ones, sync the index, end the threads.

        Waits at most ``timeout`` seconds (None: as long as it takes). Past it, every job not
        yet answered, queued or in flight, fails with 503 "the service is shutting down" (its
        upload deleted) and the lanes end after their current batch; so when ``stop`` returns,
        every job ever submitted has ended. Calling it again waits again."""
        with self._submit_lock:
            self._accepting = False
        self._set_state("stopped", SHUTTING_DOWN)
        self._stopping.set()
        self._wake_lanes()
        if self._supervisor.ident is not None:
            self._supervisor.join(timeout)
        if self._supervisor.is_alive() or self._supervisor.ident is None:
            self._halt.set()
            self._wake_lanes()
            for lane in self._lanes:
                self._end_all(list(lane.held), 503, SHUTTING_DOWN)
            self._end_all(self._intake.drain() + self._generating.drain(), 503, SHUTTING_DOWN)

    def stats(self) -> dict[str, Any]:
        """What ``GET /v1/worker`` shows: readiness, the queue, the bounds, counts since start."""
        with self._stats_lock:
            counts = dict(self._stats)
        healthy, why = self.health()
        return {
            "ready": healthy,
            "health": why,
            "failure": self.failure,
            "device": self.device or "auto",
            "queued": self._waiting(),
            "busy": any(lane.busy for lane in self._lanes),
            "fast_lane": self.fast_lane,
            "gather_ms": round(self.gather_s * 1000),
            "batch_limit": self.batch_limit,
            "queue_limit": self.queue_limit,
            "job_ttl_s": self.job_ttl_s,
            "batch_pixels": self.batch_pixels,
            **counts,
        }

    # ------------------------------------------------------------------ the supervisor
    def _supervise(self) -> None:
        """Load, run the lanes until they end; should one die, reload and run them again."""
        try:
            self._supervise_lanes()
        except BaseException as error:  # a bug in the supervisor itself: nothing may hang
            log.error(
                "the model worker's supervisor died (%s)",
                type(error).__name__,
                exc_info=(type(error), error, error.__traceback__),
            )
            self.failure = f"the model worker stopped: {internal(error)}"
            self._set_state("failed", self.failure)
            self._halt.set()
            for lane in self._lanes:
                self._end_all(list(lane.held), 500, internal(error))
            self._refuse_queued(503, self.failure)

    def _supervise_lanes(self) -> None:
        restarts: deque[float] = deque()
        while True:
            lab = self._load_or_fail()
            if lab is None:
                return
            try:
                died = self._run_lanes(lab)
            finally:
                lab.close()
            if died is None or not self._may_restart(died, restarts):
                return

    def _load_or_fail(self) -> Lab | None:
        """The lab with its models loaded; None (``failure`` set, queued jobs refused) when
        they cannot be."""
        try:
            return self._load()
        except BaseException as error:  # any failure to load ends the service, in one line
            self.failure = str(error) if isinstance(error, RsxError) else repr(error)
            self._set_state("failed", f"the models could not be loaded: {self.failure}")
            self.ready.clear()
            self._refuse_queued(503, f"the models could not be loaded: {self.failure}")
            return None

    def _load(self) -> Lab:
        """Open the lab and load every model now: the embedder, the runnable generators, the
        captioner if the lab names one, and the vector index."""
        from resynth_index.lab import Lab

        gc.unfreeze()  # a restart: what the previous lab froze may be collected now
        lab = Lab.open(self.lab_dir, device=self.device)
        try:
            self.device = lab.device
            _ = lab.embedder
            for row in lab.generators():
                load = getattr(lab.generator_model(row), "load", None)
                if callable(load):
                    load()
            self._captioner = None
            if lab.settings.captioner:
                from resynth_index.models.captioners import TransformersCaptioner

                self._captioner = TransformersCaptioner(lab.settings.captioner, device=lab.device)
            _ = lab.index
        except BaseException:
            lab.close()
            raise
        # the models are loaded for good: the collector need not walk them again and again
        # (a full collection over them cost about 1.5 ms a warm toy query)
        gc.collect()
        gc.freeze()
        return lab

    def _run_lanes(self, lab: Lab) -> BaseException | None:
        """Start the lanes on ``lab`` and look after them until they end: None when they
        stopped, or what killed one (the other is halted and waited for; their jobs ended)."""
        self._halt.clear()
        self._lane_ended.clear()
        lanes = [_Lane("generating", self._generating)]
        if self.fast_lane:
            lanes.append(_Lane("fast", self._intake))
        self._lanes = lanes
        for lane in lanes:
            lane.thread = threading.Thread(
                target=self._lane_main, args=(lab, lane), name=f"rsx-{lane.name}-lane", daemon=True
            )
            lane.thread.start()
        if not self._stopping.is_set():
            self._set_state("ready", None)
            self.ready.set()
        while not all(lane.ended for lane in lanes):
            if any(lane.died_of is not None for lane in lanes):
                break
            self._lane_ended.wait(TICK_S)
            self._lane_ended.clear()
            self._expire_waiting()
        died = next((lane.died_of for lane in lanes if lane.died_of is not None), None)
        if died is not None:
            self.ready.clear()
            self._set_state(
                "restarting",
                f"the model worker is restarting after an internal error ({type(died).__name__})",
            )
            self._halt.set()
            self._wake_lanes()
        for lane in lanes:
            assert lane.thread is not None
            lane.thread.join()  # a lane still at work finishes its batch first
            self._end_all(list(lane.held), 500, internal(died or RuntimeError()))
        if died is None:
            self._sync_index(lab)
        return died

    def _may_restart(self, died: BaseException, restarts: deque[float]) -> bool:
        """Whether to load again after ``died`` killed a lane: not when stopping, nor after
        ``MAX_RESTARTS`` within ``RESTART_WINDOW_S`` (then the worker fails for good)."""
        if self._stopping.is_set():
            self._refuse_queued(503, SHUTTING_DOWN)
            return False
        now = time.monotonic()
        restarts.append(now)
        while restarts and now - restarts[0] > RESTART_WINDOW_S:
            restarts.popleft()
        if len(restarts) > MAX_RESTARTS:
            self.failure = (
                f"the model worker died {len(restarts)} times within {RESTART_WINDOW_S:g} s"
                f" (last: {type(died).__name__}); see the log"
            )
            self._set_state("failed", self.failure)
            self._refuse_queued(503, self.failure)
            return False
        self._count("restarts")
        log.warning("restarting the model worker (restart %d)", len(restarts))
        return True

    # ------------------------------------------------------------------ the lanes
    def _lane_main(self, lab: Lab, lane: _Lane) -> None:
        """A lane's thread: its loop; should anything escape it, the thread dies here in one log
        entry, its jobs are ended (500) and the supervisor is told."""
        loop = self._fast_loop if lane.name == "fast" else self._generating_loop
        try:
            loop(lab, lane)
        except BaseException as error:  # a bug: say so, and leave no request waiting forever
            lane.died_of = error
            log.error(
                "the model worker's %s lane died (%s)",
                lane.name,
                type(error).__name__,
                exc_info=(type(error), error, error.__traceback__),
            )
            self._end_all(list(lane.held), 500, internal(error))
        finally:
            lane.ended = True
            if lane.name == "fast":
                self._generating.wake()  # the generating lane may be waiting for it to end
            self._lane_ended.set()

    def _fast_loop(self, lab: Lab, lane: _Lane) -> None:
        """Take what is waiting, route it, answer what needs no generation, pass on the rest."""
        while not self._halt.is_set():
            first = self._take(lane.queue, TICK_S)
            if first is None:
                if self._stopping.is_set() and not len(lane.queue):
                    return
                continue
            # held from the moment taken, until answered: should anything escape, the jobs
            # are found there (by _lane_main, by a stop past its timeout)
            lane.held, lane.busy = [first], True
            batch = self._more(lane.queue, lane.held, wait=False)
            fast, slow = self._route(lab, batch)
            for job in slow:
                job.set_stage("waiting for generation")
                self._generating.put(job)
            lane.held = fast
            if fast:
                self._answer_batch(lab, lane, fast, fast=True)
            lane.held, lane.busy = [], False

    def _generating_loop(self, lab: Lab, lane: _Lane) -> None:
        """Take the first job, gather more (see the module notes), answer them; sync the index
        once both lanes have been idle a while."""
        while not self._halt.is_set():
            if self._stopping.is_set() and not len(lane.queue) and self._feeder_ended():
                return
            first = self._take(lane.queue, IDLE_SYNC_S if self._unsynced else TICK_S)
            if first is None:
                self._sync_when_idle(lab)
                continue
            # busy from the first job taken until its batch is answered; held as in _fast_loop
            lane.held, lane.busy = [first], True
            batch = self._more(lane.queue, lane.held, wait=True)
            self._answer_batch(lab, lane, batch)
            lane.held, lane.busy = [], False

    def _feeder_ended(self) -> bool:
        """Whether nothing more can reach the generating lane's queue (the fast lane ended)."""
        return not self.fast_lane or all(lane.ended for lane in self._lanes if lane.name == "fast")

    def _take(
        self, queue: JobQueue, timeout: float | None, fits: Callable[[QueryJob], bool] | None = None
    ) -> QueryJob | None:
        """The next job from ``queue`` that has not waited past its TTL (those are failed)."""
        while True:
            job = queue.take(timeout, fits)
            if job is None or not self._expired(job):
                return job
            self._expire(job)

    def _more(self, queue: JobQueue, batch: list[QueryJob], *, wait: bool) -> list[QueryJob]:
        """``batch`` (holding the first job) and what joins it, within ``batch_limit`` and the
        pixel budget: everything waiting, and with ``wait``, while any of them may need
        generation, what arrives within the gather window. Jobs are added to ``batch`` in
        place (so the lane holds them as they come)."""
        pixels = sum(job.pixels for job in batch)
        deadline: float | None = None
        while len(batch) < self.batch_limit:

            def fits(job: QueryJob, used: int = pixels) -> bool:
                return used + job.pixels <= self.batch_pixels

            job = self._take(queue, 0, fits)
            if job is None:
                if not wait or self._stopping.is_set() or self._halt.is_set():
                    break
                if deadline is None:
                    if all(self._warm.knows(queued) for queued in batch):
                        break
                    deadline = time.monotonic() + self.gather_s
                    for waiting in batch:
                        waiting.set_stage("waiting for more queries to batch with")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                job = self._take(queue, remaining, fits)
                if job is None:
                    break
            batch.append(job)
            pixels += job.pixels
        return batch

    def _route(self, lab: Lab, batch: list[QueryJob]) -> tuple[list[QueryJob], list[QueryJob]]:
        """(jobs for the fast lane, jobs for the generating lane): see ``routing.route``."""
        return route(lab, batch, self._warm)

    # ------------------------------------------------------------------ answering
    def _answer_batch(
        self, lab: Lab, lane: _Lane, batch: list[QueryJob], *, fast: bool = False
    ) -> None:
        """Answer ``batch`` group by group; whatever happens, each of its jobs has ended when
        this returns (a job the fast lane passes on excepted) and its upload is deleted."""
        lane.held = batch
        started = time.monotonic()
        try:
            with self._gate.reading():
                self._answer(lab, batch, fast)
        except BaseException as error:  # the lane dies (see _lane_main); its jobs end first
            self._end_all(batch, 500, internal(error))
            raise
        finally:
            for job in batch:
                if job.finished_at is not None:
                    job.path.unlink(missing_ok=True)
            self._batch_done(time.monotonic() - started, fast)

    def _answer(self, lab: Lab, batch: Sequence[QueryJob], fast: bool) -> None:
        groups: dict[tuple, list[QueryJob]] = {}
        for job in batch:
            groups.setdefault(job.batch_key, []).append(job)
        for jobs in groups.values():
            try:
                self._answer_group(lab, jobs, fast)
            except DBAPIError as error:  # the database failed: one line, no traceback
                message = said(lab, error)
                log.warning("%d queries failed: %s", len(jobs), message)
                self._end_all(jobs, 503, message)
            except Exception as error:  # a bug in rsx: the traceback goes to the log
                log.error(
                    "internal error while answering %d queries (%s)",
                    len(jobs),
                    type(error).__name__,
                    exc_info=(type(error), error, error.__traceback__),
                )
                self._end_all(jobs, 500, internal(error))

    def _answer_group(self, lab: Lab, jobs: list[QueryJob], fast: bool) -> None:
        """One ``run_queries`` call for jobs that share candidates, K, generation and method.
        On the fast lane, a plan that turns out to need generation passes the jobs on."""
        from resynth_index.attribution.answer import QueryResult
        from resynth_index.pipeline.query import run_queries

        candidates, resyntheses, generate, method = jobs[0].batch_key
        progress = GroupProgress(jobs, self._count)
        self._count("batches")
        for job in jobs:
            job.set_stage("captioning")
        try:
            results = run_queries(
                lab,
                [job.path for job in jobs],
                candidates=list(candidates) if candidates else None,
                resyntheses=resyntheses,
                generate=generate,
                method=method,
                captioner=None if fast else self._captioner,
                progress=progress.event,
                on_plan=partial(refuse_generation, progress.plan) if fast else progress.plan,
                image_captions={j.path: j.caption for j in jobs if j.caption is not None},
                image_names={job.path: job.name for job in jobs},
            )
        except NeedsGeneration:  # stored resyntheses went away since the job was routed
            self._count("rerouted", len(jobs))
            for job in jobs:
                job.set_stage("waiting for generation")
                self._generating.put(job)
            return
        except RsxError as error:  # the whole call failed: no answer was recorded
            status = 500 if isinstance(error, ModelLoadError | StoreError) else 400
            if status == 500:
                log.warning("%d queries failed: %s", len(jobs), error)
            self._end_all(jobs, status, str(error))
            return
        if len(results) != len(jobs):
            raise RuntimeError("answers and images do not pair up")
        # every answer is made before any job ends: should one fail, they all end alike
        endings: list[Callable[[], None]] = []
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, QueryResult):
                endings.append(partial(self._finish, job, result.to_json(), fast))
            else:  # the image failed the hostile-file loader (or could not be stored)
                reason = result.error.replace(str(job.path), job.name)
                endings.append(partial(self._end, job, 422, reason))
        # the bookkeeping is done first: once a job ends, its waiter runs on the event loop, and
        # this thread should not be holding the GIL with more work then
        for end in endings:
            end()

    def _finish(self, job: QueryJob, answer: dict[str, Any], fast: bool) -> None:
        if job.finished_at is not None:  # failed meanwhile (a stop past its timeout)
            return
        job.path.unlink(missing_ok=True)
        self._warm.remember(job)
        self._count("answered")
        if fast:
            self._count("fast_answered")
        job.finish(answer)

    def _end(self, job: QueryJob, status: int, message: str) -> None:
        """Fail ``job`` (if it has not ended), its upload deleted first."""
        if job.finished_at is not None:
            return
        job.path.unlink(missing_ok=True)
        self._count("failed")
        job.fail(status, message)

    def _end_all(self, jobs: Sequence[QueryJob], status: int, message: str) -> None:
        for job in jobs:
            self._end(job, status, message)

    # ------------------------------------------------------------------ the queue's bounds
    def _waiting(self) -> int:
        """Jobs not yet started (in either lane's queue)."""
        if self._generating is self._intake:
            return len(self._intake)
        return len(self._intake) + len(self._generating)

    def _expired(self, job: QueryJob) -> bool:
        return time.monotonic() - job.queued_at > self.job_ttl_s

    def _expire(self, job: QueryJob) -> None:
        self._count("expired")
        self._end(
            job,
            503,
            f"the query waited more than {self.job_ttl_s:g} s without a free worker;"
            " it was not answered",
        )

    def _expire_waiting(self) -> None:
        """Fail the jobs that have waited past their TTL, wherever they are in line."""
        queues = {id(q): q for q in (self._intake, self._generating)}.values()
        for queue in queues:
            for job in queue.remove_expired(self.job_ttl_s):
                self._expire(job)

    def _refuse_queued(self, status: int, message: str) -> None:
        with self._submit_lock:
            self._accepting = False
        self._end_all(self._intake.drain() + self._generating.drain(), status, message)

    def _wake_lanes(self) -> None:
        self._intake.wake()
        self._generating.wake()

    # ------------------------------------------------------------------ the index
    def _sync_when_idle(self, lab: Lab) -> None:
        """Sync the index once both lanes have been idle ``IDLE_SYNC_S`` since the last batch
        (and no query reads it)."""
        with self._stats_lock:
            due = self._unsynced and time.monotonic() - self._last_batch_end >= IDLE_SYNC_S
        if not due or any(lane.busy for lane in self._lanes):
            return
        with self._gate.syncing_if_free() as free:
            if free:
                self._sync_index(lab)

    def _sync_index(self, lab: Lab) -> None:
        """Bring the index file up to date; a failure is reported and does not stop the worker
        (the index is derived: queries read what it lacks from the database, ``rsx check``
        repairs it)."""
        with self._stats_lock:
            self._unsynced = False
        try:
            lab.sync_index()
        except Exception as error:
            log.warning("the vector index file was not updated: %s", said(lab, error))

    # ------------------------------------------------------------------ bookkeeping
    def _batch_done(self, seconds: float, fast: bool) -> None:
        with self._stats_lock:
            self._unsynced = True
            self._last_batch_end = time.monotonic()
            if not fast:
                previous = self._batch_s
                self._batch_s = seconds if previous is None else 0.7 * previous + 0.3 * seconds

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += n

    def _set_state(self, state: str, reason: str | None) -> None:
        with self._stats_lock:
            if self._state in ("failed", "stopped"):
                return  # for good
            self._state, self._reason = state, reason
