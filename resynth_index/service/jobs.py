"""One query on its way through the worker, and the board that finds it again by id.

A ``QueryJob`` is made by the HTTP layer from an upload and handed to the worker. The worker
moves it through its stages (``queued``, ``captioning``, ``generating k of n``, ``embedding``)
and finishes it with the answer (``QueryResult.to_json()``) or an error and its HTTP status.
Whoever waits is told through ``add_done_callback`` (the synchronous API awaits it; the page
polls ``GET /v1/jobs/{id}``, which reads ``snapshot``). Jobs are kept for an hour after they end.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOB_ID_CHARS = 22  # secrets.token_urlsafe(16)
KEEP_FINISHED_S = 3600.0
KEEP_AT_MOST = 2000


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

    def add(self, job: QueryJob) -> None:
        with self._lock:
            self._prune()
            self._jobs[job.id] = job

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
        excess = max(0, len(self._jobs) - KEEP_AT_MOST)
        for position, (when, job_id) in enumerate(finished):
            if position < excess or now - when > KEEP_FINISHED_S:
                del self._jobs[job_id]
