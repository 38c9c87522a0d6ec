"""One query on its way through the worker, and the board that finds it again by id.

A ``QueryJob`` is made by the HTTP layer from an upload and handed to the worker. The worker
moves it through its stages (``queued``, ``captioning``, ``generating k of n``, ``embedding``)
and finishes it with the answer (``QueryResult.to_json()``) or an error and its HTTP status.
Whoever waits is told through ``add_done_callback`` (the synchronous API awaits it; the page
polls ``GET /v1/jobs/{id}``, which reads ``snapshot``). Jobs are kept for an hour after they end,
at most ``KEEP_AT_MOST`` of them (the oldest finished go first).

Jobs not yet started wait in a ``JobQueue``: first in, first out, with what a batching worker
needs beyond ``queue.Queue``: a taker may leave the oldest job where it is when it does not fit
its batch (the pixel budget), be woken early (a stop), and the jobs that waited too long can be
taken out wherever they are (``remove_expired``).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOB_ID_CHARS = 22  # secrets.token_urlsafe(16)
KEEP_FINISHED_S = 3600.0
KEEP_AT_MOST = 2000
PRUNE_EVERY_S = 60.0


@dataclass
class QueryJob:
    """What one request asks, and how far the worker has come with it."""

    path: Path  # the upload's private file
    name: str  # how the answer names the image (``upload:<file name>``)
    caption: str | None = None
    candidates: tuple[str, ...] | None = None
    resyntheses: int | None = None
    generate: bool = True
    method: str = "resynthesis"  # rsx query --method
    pixels: int = 0  # width x height from the upload's header (0: unknown); the batch budget
    queued_at: float = field(default_factory=time.monotonic)  # when it was made (its TTL)
    id: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    state: str = "queued"  # queued | running | done | failed
    stage: str = "queued"
    done: int = 0
    total: int = 0
    answer: dict[str, Any] | None = None
    error: str | None = None
    status: int = 200
    finished_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _callbacks: list[Callable[[QueryJob], None]] = field(default_factory=list, repr=False)

    @property
    def batch_key(self) -> tuple[tuple[str, ...] | None, int | None, bool, str]:
        """Jobs with the same key can be answered by one ``run_queries`` call."""
        return (self.candidates, self.resyntheses, self.generate, self.method)

    def set_stage(self, stage: str, done: int = 0, total: int = 0) -> None:
        with self._lock:
            if self.state in ("queued", "running"):
                self.state = "running"
                self.stage, self.done, self.total = stage, done, total

    def finish(self, answer: dict[str, Any]) -> None:
        """End with an answer (status 200)."""
        self._end(answer=answer, error=None, status=200)

    def fail(self, status: int, error: str) -> None:
        """End with an error: ``status`` is the HTTP status, ``error`` one line."""
        self._end(answer=None, error=" ".join(error.split()), status=status)

    def _end(self, *, answer: dict[str, Any] | None, error: str | None, status: int) -> None:
        with self._lock:
            if self.finished_at is not None:
                return
            self.answer, self.error, self.status = answer, error, status
            self.state = "done" if error is None else "failed"
            self.stage = self.state
            self.finished_at = time.monotonic()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[QueryJob], None]) -> None:
        """Call ``callback(job)`` once the job ends (now, if it already has), on the thread that
        ends it."""
        with self._lock:
            if self.finished_at is None:
                self._callbacks.append(callback)
                return
        callback(self)

    def snapshot(self) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it."""
        with self._lock:
            shown: dict[str, Any] = {
                "job": self.id,
                "state": self.state,
                "stage": self.stage,
                "done": self.done,
                "total": self.total,
            }
            if self.answer is not None:
                shown["answer"] = self.answer
                shown["query_id"] = self.answer.get("query_id")
            if self.error is not None:
                shown["error"] = self.error
                shown["status"] = self.status
            return shown


class JobBoard:
    """Jobs by id, for the page's polling; finished ones are forgotten after an hour."""

    def __init__(self) -> None:
        self._jobs: dict[str, QueryJob] = {}
        self._lock = threading.Lock()
        self._pruned_at = time.monotonic()

    def add(self, job: QueryJob) -> None:
        """Keep ``job`` for ``get``. Finished jobs are pruned once a minute, and at once when the
        board holds ``KEEP_AT_MOST`` (then down to 90 % of it, the oldest finished first), so
        the sort of the board is not paid on every request."""
        with self._lock:
            now = time.monotonic()
            if len(self._jobs) >= KEEP_AT_MOST or now - self._pruned_at >= PRUNE_EVERY_S:
                self._prune()
                self._pruned_at = now
            self._jobs[job.id] = job

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def get(self, job_id: str) -> QueryJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def _prune(self) -> None:
        now = time.monotonic()
        finished = [
            (job.finished_at, job_id)
            for job_id, job in self._jobs.items()
            if job.finished_at is not None
        ]
        finished.sort()
        # past the cap, down to 90 % of it: the sort is paid once per many requests, not each
        over = len(self._jobs) >= KEEP_AT_MOST
        excess = len(self._jobs) - KEEP_AT_MOST * 9 // 10 if over else 0
        for position, (when, job_id) in enumerate(finished):
            if position < excess or now - when > KEEP_FINISHED_S:
                del self._jobs[job_id]


class JobQueue:
    """Jobs waiting to be started, oldest first (see the module notes)."""

    def __init__(self) -> None:
        self._jobs: deque[QueryJob] = deque()
        self._changed = threading.Condition()
        self._wakes = 0  # how many times ``wake`` was called: a waiter compares

    def __len__(self) -> int:
        with self._changed:
            return len(self._jobs)

    def put(self, job: QueryJob) -> None:
        with self._changed:
            self._jobs.append(job)
            self._changed.notify_all()

    def take(
        self, timeout: float | None = None, fits: Callable[[QueryJob], bool] | None = None
    ) -> QueryJob | None:
        """The oldest job, waiting up to ``timeout`` seconds for one (None: until one comes).

        None when none came in time, when ``wake`` was called meanwhile, or when the oldest does
        not ``fits`` (it stays first in line, for the next batch)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            wakes = self._wakes
            while not self._jobs:
                remaining = None if deadline is None else deadline - time.monotonic()
                if self._wakes != wakes or (remaining is not None and remaining <= 0):
                    return None
                self._changed.wait(remaining)
            if fits is not None and not fits(self._jobs[0]):
                return None
            return self._jobs.popleft()

    def wake(self) -> None:
        """End every wait in ``take`` now (the worker is stopping or restarting)."""
        with self._changed:
            self._wakes += 1
            self._changed.notify_all()

    def remove_expired(self, ttl_s: float, now: float | None = None) -> list[QueryJob]:
        """Take out the jobs made more than ``ttl_s`` seconds ago; those taken, oldest first."""
        now = time.monotonic() if now is None else now
        with self._changed:
            expired = [job for job in self._jobs if now - job.queued_at > ttl_s]
            if expired:
                gone = {id(job) for job in expired}
                self._jobs = deque(job for job in self._jobs if id(job) not in gone)
            return expired

    def drain(self) -> list[QueryJob]:
        """Take out every job; those taken, oldest first."""
        with self._changed:
            jobs, self._jobs = list(self._jobs), deque()
            return jobs
