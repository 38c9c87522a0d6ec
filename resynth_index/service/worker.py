"""The model worker: one thread per device owns the lab's models and answers queued queries.

Requests wait in a queue. The worker takes the first, then what else is waiting (up to
``batch_limit``); when a query may need generation (its caption was never answered here) it also
waits up to ``gather_s`` for more to arrive, so concurrent queries that need the same generator
are made in one generation batch. Jobs that share (candidates, resyntheses, generate) go to one
``run_queries`` call, each with its own caption; that call writes every answer's audit row in one
transaction, so a query is recorded whole or not at all. A query whose caption this worker has
answered before skips the gather window: a warm query pays no wait.

``stop`` refuses new jobs, finishes every job already queued (answered and recorded), brings
the vector index file up to date and lets the thread end. The index is otherwise synced when the
worker has been idle a moment (a query never writes it). The worker keeps the index loaded: a
query gathers the vectors it holds from memory and reads the newer ones from the database.
"""

from __future__ import annotations

import gc
import queue
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resynth_index.errors import ModelLoadError, RsxError, StoreError
from resynth_index.service.jobs import QueryJob

if TYPE_CHECKING:
    from resynth_index.lab import Lab

GATHER_S = 0.03
BATCH_LIMIT = 16
IDLE_SYNC_S = 2.0
_STOP = object()


class ServiceClosing(Exception):
    """The worker no longer takes jobs (it is stopping, or its models failed to load)."""


class QueryWorker:
    """Owns one ``Lab`` with its models on ``device`` and answers ``QueryJob``s in batches."""

    def __init__(
        self,
        lab_dir: Path,
        device: str | None = None,
        *,
        gather_s: float = GATHER_S,
        batch_limit: int = BATCH_LIMIT,
    ) -> None:
        self.lab_dir = Path(lab_dir)
        self.device = device
        self.gather_s = gather_s
        self.batch_limit = max(1, batch_limit)
        self.ready = threading.Event()
        self.failure: str | None = None  # why the models could not be loaded
        self._queue: queue.Queue[Any] = queue.Queue()
        self._accepting = True
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rsx-model-worker", daemon=True)
        self._warm: set[tuple[str, tuple[str, ...] | None, int | None]] = set()
        self._stats = {"batches": 0, "generation_batches": 0, "answered": 0, "failed": 0}
        self._stats_lock = threading.Lock()
        self._busy = False
        self._captioner: Any = None

    # ------------------------------------------------------------------ the outside
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: QueryJob) -> None:
        """Queue ``job``; ServiceClosing when the worker takes no more."""
        with self._submit_lock:
            if not self._accepting:
                raise ServiceClosing("the service is shutting down")
            if self.failure is not None:
                raise ServiceClosing(f"the models could not be loaded: {self.failure}")
            self._queue.put(job)

    def stop(self, timeout: float | None = None) -> None:
        """Take no more jobs, finish the queued ones, sync the index, end the thread."""
        with self._submit_lock:
            if self._accepting:
                self._accepting = False
                self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        """What ``GET /v1/worker`` shows: readiness, the queue, and counts since start."""
        with self._stats_lock:
            counts = dict(self._stats)
            busy = self._busy
        return {
            "ready": self.ready.is_set(),
            "failure": self.failure,
            "device": self.device or "auto",
            "queued": self._queue.qsize(),
            "busy": busy,
            "gather_ms": round(self.gather_s * 1000),
            "batch_limit": self.batch_limit,
            **counts,
        }

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            lab = self._load()
        except Exception as error:  # any failure to load ends the service, in one line
            self.failure = str(error) if isinstance(error, RsxError) else repr(error)
            self._refuse_queued()
            return
        self.ready.set()
        try:
            self._serve(lab)
        except BaseException as error:  # a bug: say so, and leave no request waiting forever
            traceback.print_exc(file=sys.stderr)
            self.failure = f"the model worker stopped: {error!r}"
            self._refuse_queued()
        finally:
            lab.close()

    def _load(self) -> Lab:
        """Open the lab and load every model now: the embedder, the runnable generators, the
        captioner if the lab names one, and the vector index."""
        from resynth_index.lab import Lab

        lab = Lab.open(self.lab_dir, device=self.device)
        try:
            self.device = lab.device
            _ = lab.embedder
            for row in lab.generators():
                load = getattr(lab.generator_model(row), "load", None)
                if callable(load):
                    load()
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

    def _serve(self, lab: Lab) -> None:
        unsynced = False
        while True:
            try:
                first = self._queue.get(timeout=IDLE_SYNC_S if unsynced else None)
            except queue.Empty:
                _sync_index(lab)
                unsynced = False
                continue
            if first is _STOP:
                break
            self._set_busy(True)  # from the first job taken until its batch is answered
            try:
                batch, stopping = self._gather(first)
                self._answer(lab, batch)
            finally:
                self._set_busy(False)
            unsynced = True
            if stopping:
                break
        if unsynced:
            _sync_index(lab)

    def _gather(self, first: QueryJob) -> tuple[list[QueryJob], bool]:
        """``first`` and what joins it: everything waiting, and while any of them may need
        generation, what arrives within the gather window. (batch, whether STOP came)."""
        batch = [first]
        deadline: float | None = None
        while len(batch) < self.batch_limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if deadline is None:
                    if all(self._is_warm(job) for job in batch):
                        break
                    deadline = time.monotonic() + self.gather_s
                    for job in batch:
                        job.set_stage("waiting for more queries to batch with")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _is_warm(self, job: QueryJob) -> bool:
        if not job.generate:
            return True
        return job.caption is not None and self._key(job) in self._warm

    @staticmethod
    def _key(job: QueryJob) -> tuple[str, tuple[str, ...] | None, int | None]:
        return (job.caption or "", job.candidates, job.resyntheses)

    def _answer(self, lab: Lab, batch: Sequence[QueryJob]) -> None:
        groups: dict[tuple, list[QueryJob]] = {}
        for job in batch:
            groups.setdefault(job.batch_key, []).append(job)
        for jobs in groups.values():
            try:
                self._answer_group(lab, jobs)
            finally:
                for job in jobs:
                    job.path.unlink(missing_ok=True)

    def _answer_group(self, lab: Lab, jobs: list[QueryJob]) -> None:
        """One ``run_queries`` call for jobs that share candidates, K, generation and method."""
        from resynth_index.pipeline.query import QueryResult, run_queries

        candidates, resyntheses, generate, method = jobs[0].batch_key
        progress = _GroupProgress(jobs, self._count)
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
                captioner=self._captioner,
                progress=progress.event,
                on_plan=progress.plan,
                image_captions={j.path: j.caption for j in jobs if j.caption is not None},
                image_names={job.path: job.name for job in jobs},
            )
        except RsxError as error:  # the whole call failed: no answer was recorded
            status = 500 if isinstance(error, ModelLoadError | StoreError) else 400
            self._fail_all(jobs, status, str(error))
            return
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            self._fail_all(jobs, 500, f"internal error ({type(error).__name__}); see the log")
            return
        if len(results) != len(jobs):
            self._fail_all(jobs, 500, "internal error: answers and images do not pair up")
            return
        endings = []
        for job, result in zip(jobs, results, strict=True):
            job.path.unlink(missing_ok=True)
            if isinstance(result, QueryResult):
                endings.append(partial(job.finish, result.to_json()))
                self._count("answered")
                if job.caption is not None:
                    self._warm.add(self._key(job))
            else:  # the image failed the hostile-file loader (or could not be stored)
                reason = result.error.replace(str(job.path), job.name)
                endings.append(partial(job.fail, 422, reason))
                self._count("failed")
        # the bookkeeping is done first: once a job ends, its waiter runs on the event loop, and
        # this thread should not be holding the GIL with more work then
        for end in endings:
            end()

    def _fail_all(self, jobs: list[QueryJob], status: int, message: str) -> None:
        for job in jobs:
            job.fail(status, message)
            self._count("failed")

    def _refuse_queued(self) -> None:
        with self._submit_lock:
            self._accepting = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, QueryJob):
                item.fail(503, f"the models could not be loaded: {self.failure}")
                item.path.unlink(missing_ok=True)

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += n

    def _set_busy(self, busy: bool) -> None:
        with self._stats_lock:
            self._busy = busy


def _sync_index(lab: Lab) -> None:
    """Bring the index file up to date; a failure is reported and does not stop the worker
    (the index is derived: queries read what it lacks from the database, ``rsx check`` repairs
    it)."""
    try:
        lab.sync_index()
    except Exception as error:
        print(f"rsx serve: the vector index file was not updated: {error!r}", file=sys.stderr)


class _GroupProgress:
    """Turns ``run_queries``' progress into each job's stage: captioning, generating k of n
    (over every generator of the call, from its plan), embedding."""

    def __init__(self, jobs: list[QueryJob], count) -> None:
        self.jobs = jobs
        self.count = count
        self.planned = 0
        self.made: dict[str, int] = {}

    def plan(self, planned: Any) -> None:
        self.planned = int(getattr(planned, "total", 0))
        if self.planned:
            self._stage("generating", 0, self.planned)

    def event(self, event: Any) -> None:
        stage = getattr(event, "stage", "")
        done, total = int(getattr(event, "done", 0)), int(getattr(event, "total", 0))
        if stage == "load":
            self._stage("captioning", done, total)
        elif stage == "generate":
            generator = getattr(event, "generator", None) or ""
            if done > self.made.get(generator, 0):
                self.count("generation_batches")  # one per generate() call
            self.made[generator] = done
            made = sum(self.made.values())
            self._stage("generating", made, max(self.planned, made))
        elif stage == "embed":
            self._stage("embedding", done, total)

    def _stage(self, stage: str, done: int, total: int) -> None:
        text = f"{stage} {done} of {total}" if stage == "generating" else stage
        for job in self.jobs:
            job.set_stage(text, done, total)
