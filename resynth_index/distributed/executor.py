"""Resynthesis through Ray: actors generate, this process (the coordinator) stores.

The work is what the local path would do: ``plan_resyntheses`` says what is missing, and the
missing (caption, seed) pairs of each generator are cut into tasks of ``batch_size``, the size
of a local batch. A batch size of "auto" (the lab's default) is resolved as the local path
resolves it, by ``models.generators.batching.generator_batch_size`` on an actor, where the
generator runs (its device, its free memory once loaded), once per generator before the run.
Each task goes to an actor of a pool (one per GPU where the cluster has GPUs, one per CPU
otherwise) that is free: one task in flight per actor, the next handed to whichever finishes
first, so a slow actor never holds a queue while the others idle. Every actor can hold any
generator: the tasks go out in plan order, generator after generator, so each actor loads each
generator once, and one pool serves the whole run (and, for a ``RayResynthesizer`` kept open,
the runs after it).

Why the coordinator writes. Every result comes back here as PNG bytes and is stored by
``pipeline.resynthesis.store_resyntheses``, the function the local path stores with: blobs,
then image and resynthesis rows in one transaction, then embeddings. One writer means one
embedder (the lab's), one FAISS index to catch up, no database credentials on worker nodes, and
no write that a retried task can repeat: an actor only generates. The writes are idempotent all
the same (images are content-addressed, a resynthesis slot is unique and a second insert is
ignored), so two coordinators on one PostgreSQL lab, or a coordinator re-run after a crash,
store nothing twice. A batch is committed as it lands; a coordinator killed mid-run keeps every
committed batch and a re-run plans only the rest.

Faults. Actors are created with ``max_restarts`` and ``max_task_retries``: an actor whose
process dies is restarted (reloading its generator) and its unfinished tasks run again.
Generation is deterministic per (generator, caption, seed), so a rerun task returns the same
pictures. What Ray cannot recover from (a task's own error, an actor dead beyond its restarts,
an object or its owner lost, a worker crashed) ends the run with one line, never a traceback:
the tasks still in flight are cancelled, every batch stored so far stays committed, and a rerun
plans only the rest. Nothing is lost but the work of the batches not stored yet.
"""

from __future__ import annotations

import io
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resynth_index.distributed.actors import GeneratorSpec, GeneratorWorker
from resynth_index.distributed.lent_digests import lend_generator
from resynth_index.distributed.session import (
    RayOptions,
    join_ray,
    leave_ray,
    ray_cause,
    require_ray,
)
from resynth_index.errors import RsxError
from resynth_index.models.generators import factory
from resynth_index.models.generators.batching import default_batch_size, is_auto
from resynth_index.pipeline.plans import (
    ProgressCallback,
    ResynthesisPlan,
    ResynthesizeSummary,
)
from resynth_index.pipeline.resynthesis import (
    BatchTask,
    GeneratedBatch,
    RunHooks,
    generate_missing,
    resynthesize,
)
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    from resynth_index.lab import Lab

#: How often Ray restarts a dead actor, and reruns a task whose actor died, before giving up.
ACTOR_RESTARTS = 4
TASK_RETRIES = 4

logger = logging.getLogger(__name__)


class RayResynthesizer:
    """Runs ``rsx resynthesize``'s work on a Ray cluster; see the module docstring.

    ``pool`` holds the actor handles of the generator being served (empty between generators):
    a test reaches them there to kill one mid-run.
    """

    def __init__(self, lab: Lab, options: RayOptions | None = None) -> None:
        self.lab = lab
        self.options = options or RayOptions()
        self.pool: list[Any] = []
        self._pid_refs: list[Any] = []  # the pool's process ids, asked for when it was made
        self._pids: list[int] | None = None
        self._started_ray = False

    # ------------------------------------------------------------------ the cluster
    def connect(self) -> None:
        """Join (or start) the Ray cluster, unless this process is already connected."""
        self._started_ray = join_ray(self.options) or self._started_ray

    def close(self) -> None:
        """Let the pool go, and stop Ray if this object started it."""
        self._release_pool()
        if self._started_ray:
            leave_ray()
            self._started_ray = False

    def __enter__(self) -> RayResynthesizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _gpus(self) -> int:
        return int(require_ray().cluster_resources().get("GPU", 0))

    def _pool_size(self, tasks: int) -> int:
        if self.options.actors is not None:
            wanted = self.options.actors
        else:
            gpus = self._gpus()
            wanted = gpus or int(require_ray().cluster_resources().get("CPU", 1))
        return max(1, min(wanted, tasks))

    def _ensure_pool(self, size: int) -> None:
        """Start ``size`` actors unless a pool is already up (it serves every later run too)."""
        if self.pool:
            return
        ray = require_ray()
        remote = ray.remote(
            num_cpus=1,
            num_gpus=1 if self._gpus() else 0,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=TASK_RETRIES,
        )(GeneratorWorker)
        # not waited for: the actors start (each importing torch and diffusers) while this
        # process loads its embedder and sends the first tasks; an actor that cannot start
        # fails the first task sent to it (``_run``)
        self.pool = [remote.remote() for _ in range(size)]
        self._pid_refs = [actor.pid.remote() for actor in self.pool]
        self._pids = None

    @property
    def pool_pids(self) -> list[int]:
        """The process ids of the pool's actors as they started (waits for them to be up)."""
        if self._pids is None:
            self._pids = list(require_ray().get(self._pid_refs)) if self._pid_refs else []
        return self._pids

    def _load_embedder_meanwhile(self) -> None:
        """Load this process's embedder (which stores every batch) while the actors start, not
        after the first batch has come back: on a cold run the two start-ups overlap."""
        self.lab.embedder  # noqa: B018 - loaded and kept by the lab

    def _release_pool(self) -> None:
        if not self.pool:
            return
        ray = require_ray()
        for actor in self.pool:
            ray.kill(actor, no_restart=True)
        self.pool = []
        self._pid_refs = []
        self._pids = None

    # ------------------------------------------------------------------ the work
    def resynthesize(
        self,
        captions: dict[str, str],
        generators: Sequence[GeneratorRow],
        *,
        batch_size: int | str | None = None,
        progress: Callable[[int], None] | None = None,
        on_plan: Callable[[int], None] | None = None,
        events: ProgressCallback | None = None,
    ) -> ResynthesizeSummary:
        """``pipeline.resynthesis.resynthesize`` with the batches generated on the cluster."""
        return resynthesize(
            self.lab,
            captions,
            generators,
            runner=self,
            batch_size=batch_size,
            progress=progress,
            on_plan=on_plan,
            events=events,
        )

    def generate_missing(
        self,
        plan: ResynthesisPlan,
        generators: Sequence[GeneratorRow],
        caption_texts: dict[str, str],
        *,
        batch_size: int | str | None = None,
        progress: Callable[[int], None] | None = None,
        events: ProgressCallback | None = None,
    ) -> list[int]:
        """``pipeline.resynthesis.generate_missing`` with the batches generated on the
        cluster and stored here as they land. ``rsx query --executor ray`` makes its
        resyntheses through this (``for_query``)."""
        return generate_missing(
            self.lab,
            plan,
            generators,
            caption_texts,
            runner=self,
            batch_size=batch_size,
            progress=progress,
            events=events,
        )

    def for_query(
        self,
        lab: Lab,
        plan: ResynthesisPlan,
        generators: Sequence[GeneratorRow],
        caption_texts: dict[str, str],
        *,
        events: ProgressCallback | None = None,
    ) -> list[int]:
        """``generate_missing`` as ``pipeline.query.run_queries`` calls its ``generator``: the
        query's missing resyntheses, made on the cluster and stored here. Ray is joined (or
        started) only when there is something to make."""
        if lab is not self.lab:
            raise RsxError("a Ray executor serves the lab it was made for")
        return self.generate_missing(plan, generators, caption_texts, events=events)

    def run(
        self,
        work: Mapping[str, list[tuple[str, int]]],
        rows: Mapping[str, GeneratorRow],
        captions: Mapping[str, str],
        setting: int | str,
        hooks: RunHooks,
    ) -> Iterator[GeneratedBatch]:
        """The ``BatchRunner`` of the cluster: ``work`` cut into tasks of each generator's batch
        ("auto" resolved on an actor, see ``_auto_sizes``), handed out to the pool, each
        generated batch yielded as it lands (decoded from the actor's PNG bytes)."""
        if not work:
            return
        self.connect()
        specs = {name: self._spec(rows[name]) for name in work}  # once: they stat files
        if is_auto(setting):
            sizes = self._auto_sizes([(specs[name], len(pairs)) for name, pairs in work.items()])
        else:
            sizes = {name: int(setting) for name in work}
        for name, size in sizes.items():
            hooks.sized(name, size)
        tasks = [
            _Task(specs[name], BatchTask(rows[name], list(chunk), len(pairs), sizes[name]))
            for name, pairs in work.items()
            for chunk in (pairs[i : i + sizes[name]] for i in range(0, len(pairs), sizes[name]))
        ]
        self._ensure_pool(self._pool_size(len(tasks)))
        self._load_embedder_meanwhile()
        yield from self._landed(tasks, captions, hooks)

    def _auto_sizes(self, work: list[tuple[GeneratorSpec, int]]) -> dict[str, int]:
        """The "auto" batch of each generator (given with its count of missing images), as an actor
        resolves it where it runs.

        The pool is started first, sized by the most tasks the run can have (the batch the
        device type gives before the memory cap: the cap only makes batches smaller, so tasks
        more). One actor sizes every generator, the first one last, so it ends up holding the
        generator its first task needs (a CPU run loads nothing to size; on CUDA each generator
        after the first is loaded once more on that actor).
        """
        ray = require_ray()
        device_type = "cuda" if self._gpus() else "cpu"
        most = 0
        for spec, missing in work:
            settings = factory.generation_settings(spec.kind, spec.settings_json)
            width, height = (settings.width, settings.height) if settings else (512, 512)
            most += -(-missing // default_batch_size(device_type, width, height))
        self._ensure_pool(self._pool_size(most))
        self._load_embedder_meanwhile()
        sizer = self.pool[0]
        sizes: dict[str, int] = {}
        for spec, _missing in reversed(work):
            try:
                sizes[spec.name] = int(ray.get(sizer.batch_size.remote(spec)))
            except ray.exceptions.RayError as error:
                raise RsxError(
                    f"sizing batches of {spec.name!r} on Ray: {ray_cause(error)}"
                ) from None
        return sizes

    def _spec(self, row: GeneratorRow) -> GeneratorSpec:
        """What an actor needs to rebuild ``row``'s generator, with the digests this lab knows
        of its files (an actor on this node then reads none of them)."""
        source = _absolute(self.lab, row.source)
        return GeneratorSpec(
            name=row.name,
            kind=row.kind,
            source=source,
            settings_json=row.settings_json,
            device=self.lab.device,
            fingerprint=row.fingerprint,
            settings_hash=factory.settings_hash(row.kind, row.settings_json, self.lab.device),
            digests=lend_generator(self.lab.file_digests, row.kind, source, row.settings_json),
        )

    def _landed(
        self, tasks: list[_Task], captions: Mapping[str, str], hooks: RunHooks
    ) -> Iterator[GeneratedBatch]:
        """Hand ``tasks`` out in plan order, each to an actor that is free (``_Flight``), and
        yield each batch as it lands, while the loop stores it.

        Before each batch is yielded, every actor whose task has finished meanwhile is handed
        its next one, so it generates while this process stores. Should anything fail (here, or
        in the loop storing a batch), the tasks still in flight are cancelled before the error
        goes on: every batch stored so far stays committed, and a rerun makes the rest.
        """
        ray = require_ray()
        flight = _Flight(self.pool, tasks)
        fetched: deque[tuple[_Task, list[bytes]]] = deque()  # at most one batch per actor
        announced: set[str] = set()
        kept = 0  # resyntheses yielded, hence stored: the loop stores a batch before the next

        def send(actor: Any, task: _Task) -> Any:
            if task.spec.name not in announced:
                announced.add(task.spec.name)
                hooks.announce(task.spec.name, task.batch.of)
            requests = [(captions[c], seed) for c, seed in task.batch.chunk]
            return actor.generate.remote(task.spec, requests, task.batch.batch_size)

        try:
            flight.hand_out(send)
            while flight.running or fetched:
                for ref, actor, task in flight.finished(wait=not fetched):
                    try:
                        fetched.append((task, ray.get(ref)))
                    except ray.exceptions.RayError as error:
                        raise self._failed(flight, error, task, kept) from None
                    flight.free.append(actor)
                flight.hand_out(send)
                task, pictures = fetched.popleft()
                images = [_decode(data) for data in pictures]
                del pictures  # let go before the next batch is fetched
                yield GeneratedBatch(task.batch, images)
                kept += len(task.batch.chunk)
        except BaseException:  # an error, Ctrl-C, or the loop letting go of this iterator
            flight.cancel()
            raise

    def _failed(self, flight: _Flight, error: Any, task: _Task, kept: int) -> RsxError:
        """The one-line error for a Ray failure of ``task``, once the tasks still in flight are
        cancelled; ``kept`` resyntheses were stored before it. A failure that is not the task's
        own (an actor dead for good, an object or its owner lost, a worker crashed) lets the pool
        go too: a pool kept open for later runs (``rsx query``) starts afresh at the next."""
        ray = require_ray()
        flight.cancel()
        if not isinstance(error, ray.exceptions.RayTaskError):
            self._release_pool()
        return RsxError(_failure(ray, error, task.spec.name) + _kept(kept))


class _Flight:
    """A run's tasks between plan and store: those waiting (in plan order), the actors that are
    free, and one task in flight per busy actor (ref -> actor and task).

    Each task goes to an actor that is free, never into the queue of a busy one: a slow actor (a
    slower device, a restart reloading its generator) takes fewer tasks, where handing them out
    in turn would leave the others idle at the end of the run while its queue drains. Tasks
    still leave in plan order, generator after generator, so an actor sees a generator's tasks
    before the next's and loads each once; the first goes to the pool's first actor, the one
    that sized the batches (``_auto_sizes``) and holds the first generator. Batches land in any
    order: each is stored on its own (``store_resyntheses``) and ``_Landing`` keeps the seeds'.
    """

    def __init__(self, pool: Sequence[Any], tasks: Sequence[_Task]) -> None:
        self.waiting = deque(tasks)
        self.free = deque(pool)
        self.running: dict[Any, tuple[Any, _Task]] = {}

    def hand_out(self, send: Callable[[Any, _Task], Any]) -> None:
        """Give each free actor the next waiting task (``send`` submits it, returning its ref)."""
        while self.waiting and self.free:
            actor, task = self.free.popleft(), self.waiting.popleft()
            self.running[send(actor, task)] = (actor, task)

    def finished(self, wait: bool) -> list[tuple[Any, Any, _Task]]:
        """The tasks in flight that have finished, well or not (each as its ref, its actor and
        the task), taken out of flight; with ``wait``, at least one, waited for."""
        ray = require_ray()
        ready, rest = [], list(self.running)
        if wait and rest:
            ready, rest = ray.wait(rest, num_returns=1)
        if rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready = [*ready, *more]
        return [(ref, *self.running.pop(ref)) for ref in ready]

    def cancel(self) -> None:
        """Cancel every task in flight and drop those waiting: after a failure their pictures
        would not be stored (a rerun makes them), so the actors should not spend time on them.
        A task that finished meanwhile, or whose actor is gone, cannot be cancelled: that is
        not an error."""
        ray = require_ray()
        for ref in self.running:
            with suppress(Exception):
                ray.cancel(ref)
        self.running.clear()
        self.waiting.clear()


@dataclass(frozen=True)
class _Task:
    """One batch of one generator's work (``batch``), with what an actor needs to rebuild the
    generator (``spec``)."""

    spec: GeneratorSpec
    batch: BatchTask


def _absolute(lab: Lab, stored: str | None) -> Path | None:
    """A generator's stored source made absolute (lab-relative ones against the lab root, itself
    made absolute: ``--lab ./lab`` is relative to this process's folder, not an actor's)."""
    if stored is None:
        return None
    path = Path(stored)
    return path if path.is_absolute() else Path(os.path.abspath(lab.root / path))


def _failure(ray: Any, error: Any, name: str) -> str:
    """What went wrong generating with ``name``, in one line, for any Ray error: the task's own
    error, an actor dead for good, or the rest (an object or its owner lost, a worker crashed,
    a timeout), named by its kind."""
    if isinstance(error, ray.exceptions.RayTaskError):
        return f"generating with {name!r} on Ray: {ray_cause(error)}"
    if isinstance(error, ray.exceptions.RayActorError):  # could not start, or died for good
        return (
            f"a Ray actor generating with {name!r} could not start or died beyond its "
            f"{ACTOR_RESTARTS} restarts: {ray_cause(error)}"
        )
    return f"generating with {name!r} on Ray: {type(error).__name__}: {ray_cause(error)}"


def _kept(count: int) -> str:
    """What a failed run kept, said after its error: the batches stored before the failure stay
    stored ("" when there were none)."""
    if not count:
        return ""
    one = count == 1
    stored = f"{count} resynthes{'is' if one else 'es'} stored before the failure"
    return f" ({stored} {'is' if one else 'are'} kept; a rerun makes only the rest)"


def _decode(data: bytes) -> Any:
    """A PIL image from PNG bytes an actor made (fully loaded: the buffer is let go)."""
    import PIL.Image

    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    return image


def resynthesize_with_ray(
    lab: Lab,
    captions: dict[str, str],
    generators: Sequence[GeneratorRow],
    options: RayOptions | None = None,
    **kwargs: Any,
) -> ResynthesizeSummary:
    """``RayResynthesizer(lab, options).resynthesize(...)``, connecting and closing around it."""
    with RayResynthesizer(lab, options) as runner:
        return runner.resynthesize(captions, generators, **kwargs)
