"""Which lane answers a query, and what a lane's answer reports on its way.

A query needs the generating lane when some candidate lacks a resynthesis of its caption (the
store is asked, ``needing_generation``), when it has no caption (the captioner runs there) or
uses the fused method (generator models, layer readers); every other one is answered on the
fast lane, beside any generation under way. ``WarmMemory`` remembers the captions answered here
before, so a warm query skips the store's question; should its resyntheses be gone after all,
the fast lane's ``on_plan`` (``refuse_generation``) raises ``NeedsGeneration`` before anything
is written, and the job goes on to the generating lane.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from resynth_index.errors import RsxError
from resynth_index.service.jobs import QueryJob

if TYPE_CHECKING:
    from resynth_index.lab import Lab

log = logging.getLogger("rsx.serve.worker")

WarmKey = tuple[str, tuple[str, ...] | None, int | None]
WARM_KEYS = 4096


class NeedsGeneration(Exception):
    """Raised by the fast lane's ``on_plan``: the store changed since the job was routed."""


class WarmMemory:
    """The captions (with candidates and K) answered here before: an LRU of ``WARM_KEYS``."""

    def __init__(self, size: int = WARM_KEYS) -> None:
        self.size = size
        self._keys: OrderedDict[WarmKey, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def knows(self, job: QueryJob) -> bool:
        """Whether ``job`` needs no generation by what this worker has answered before."""
        if not job.generate:
            return True
        if job.caption is None:
            return False
        with self._lock:
            return _key(job) in self._keys

    def remember(self, job: QueryJob) -> None:
        """Remember that ``job``'s caption was answered."""
        if job.caption is None:
            return
        with self._lock:
            self._keys[_key(job)] = None
            self._keys.move_to_end(_key(job))
            while len(self._keys) > self.size:
                self._keys.popitem(last=False)


def _key(job: QueryJob) -> WarmKey:
    return (job.caption or "", job.candidates, job.resyntheses)


def route(
    lab: Lab, batch: list[QueryJob], warm: WarmMemory
) -> tuple[list[QueryJob], list[QueryJob]]:
    """(jobs that need no generation, jobs for the generating lane), asking the store about
    the captions ``warm`` does not know."""
    fast: list[QueryJob] = []
    slow: list[QueryJob] = []
    asked: dict[tuple[tuple[str, ...] | None, int | None], list[QueryJob]] = {}
    for job in batch:
        if job.method != "resynthesis" or job.caption is None:
            slow.append(job)  # the captioner, generator models, layer readers: theirs
        elif warm.knows(job):
            fast.append(job)
        else:
            asked.setdefault((job.candidates, job.resyntheses), []).append(job)
    for (candidates, resyntheses), jobs in asked.items():
        try:
            missing = needing_generation(lab, jobs, candidates, resyntheses)
        except Exception as error:  # the generating lane will meet it and say so
            log.warning("could not tell whether queries need generation: %s", said(lab, error))
            slow.extend(jobs)
            continue
        for job in jobs:
            needs = _caption_hash(job.caption or "") in missing
            (slow if needs else fast).append(job)
    return fast, slow


def needing_generation(
    lab: Lab,
    jobs: Sequence[QueryJob],
    candidates: tuple[str, ...] | None,
    resyntheses: int | None,
) -> set[str]:
    """The caption hashes, among ``jobs``', that lack a resynthesis by some candidate (what
    ``run_queries`` would generate). Unknown candidates: none (the query fails at once)."""
    from resynth_index.pipeline.plans import plan_resyntheses
    from resynth_index.pipeline.query import select_candidates

    try:
        generators = select_candidates(lab, list(candidates) if candidates else None)
    except RsxError:
        return set()
    hashes = [_caption_hash(job.caption or "") for job in jobs]
    plan = plan_resyntheses(lab, hashes, generators, resyntheses)
    return {caption for work in plan.missing.values() for caption, _seed in work}


def _caption_hash(text: str) -> str:
    from resynth_index.media.captions import caption_hash

    return caption_hash(text)


def refuse_generation(plan: Callable[[Any], None], planned: Any) -> None:
    """The fast lane's ``on_plan``: nothing may be generated there."""
    if int(getattr(planned, "total", 0)):
        raise NeedsGeneration
    plan(planned)


def internal(error: BaseException) -> str:
    """What a client is told of a bug: its type only (the details are in the log)."""
    return f"internal error ({type(error).__name__}); see the log"


def said(lab: Lab, error: Exception) -> str:
    """An error in one line: a database's in its words (``database_failure``), else its text."""
    if isinstance(error, DBAPIError):
        from resynth_index.store.engine import database_failure, database_name

        return database_failure(error, database_name(lab.engine))
    return " ".join(str(error).split()) or type(error).__name__


class GroupProgress:
    """Turns ``run_queries``' progress into each job's stage: captioning, generating k of n
    (over every generator of the call, from its plan), embedding."""

    def __init__(self, jobs: list[QueryJob], count: Callable[[str], None]) -> None:
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
