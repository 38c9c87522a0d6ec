"""Reading image files for ingest: on the loader thread, or in worker processes sized to the cores.

One file's load (``load_file``) is the same wherever it runs: stat, read, SHA-256, decode (EXIF
orientation applied, ``max_pixels`` enforced: ``load_image_file``), the caption its role needs
from the item, its sidecar or its embedded prompt (``caption_for``), the blob staged
(``BlobStore.stage``: a temporary file beside its place, put in place with its batch by
``BlobStore.place`` in the ingest's process) and, in a worker, the
pixels the embedder's preprocess transform makes of it. A file that fails (unreadable, not an
image, too large, a blank caption) comes back as its one-line reason, never as an exception.

Ingest keeps the database and the forward pass in its own process: the store's checks that need
the database (``pipeline/ingest.py``), the rows, the embeddings. A resynthesis's blob waits for
those checks (its slot may be taken), so ``load_file`` writes it only when asked
(``FileJob.write_blob``); every other role's blob is staged where the file is read.

``LoadingPool`` runs ``load_file`` in worker processes (forkserver where the platform has it,
else spawn: never a plain fork of a process whose torch threads may be running). A worker
ignores Ctrl-C (the ingest's own process handles it, and shuts the pool down), runs torch on one
thread, and returns pixels as numpy arrays. A worker that dies (killed, a decoder that crashes
the interpreter) ends the ingest with one line (``WorkerDied``); the batch it was loading stores
nothing.

``resolve_workers`` says how many workers an ingest runs: see ``AUTO_MIN_WORKERS`` and
``MIN_FILES_PER_WORKER`` for the rule ``--workers auto`` follows.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from resynth_index.errors import RsxError
from resynth_index.hashing import FileStat, file_stat
from resynth_index.media.captions import caption_hash, normalise_caption, sidecar_text
from resynth_index.media.images import LoadedImage, load_image_file
from resynth_index.media.metadata import embedded_prompt
from resynth_index.store.blobs import BlobStore, StagedBlob

#: ``--workers auto`` runs worker processes only when this many cores are left over after one
#: for the ingest's own process (the forward pass and the store). On a 2-core machine one worker
#: process only moves the loader thread's work to another process that competes for the same
#: two cores, and it costs a second or more to start (each worker imports torch): measured on
#: the 2-core CI machine, the loader thread was as fast or faster, so auto chooses it there.
AUTO_MIN_WORKERS = 2
#: ``--workers auto`` gives each worker process at least this many files to load, fewer workers
#: (or none, the loader thread) for smaller ingests: starting a worker costs about as much as
#: loading a few hundred small images on the thread.
MIN_FILES_PER_WORKER = 128


class WorkerDied(RsxError):
    """A loading worker process ended abruptly; the batch it was loading stored nothing."""


class FileJob(NamedTuple):
    """One file to load, with what its role needs to know before its blob is written."""

    path: Path
    role: str
    caption: str | None  # given with the item; else found from the file for non-query roles
    write_blob: bool  # False for a resynthesis: its slot is checked (in the database) first


@dataclass
class FileLoad:
    """What ``load_file`` made of one file: its image (or why it failed) and its blob."""

    failure: str | None = None  # the one-line reason (no path) when the file cannot be stored
    image: LoadedImage | None = None  # ``image.image`` is None when it stayed in the worker
    caption: tuple[str, str] | None = None  # (hash, normalised text) the role records
    before: FileStat | None = None  # the file's stat before the read, when the read changed nothing
    staged: StagedBlob | None = None  # for ``BlobStore.place`` before a row points at the blob
    pixels: Any = None  # the preprocessed image (numpy, (3, H, W)) when a transform was given
    pid: int = 0  # the process that loaded it


def caption_for(path: Path, role: str, given: str | None, data: bytes) -> tuple[str, str] | None:
    """The caption (hash, normalised text) the item's role records, from the item, else (for a
    reference or resynthesis) the file's sidecar or embedded prompt; None when it has none.
    Raises RsxError for a blank caption, and for a resynthesis without any."""
    text = given
    if text is None and role != "query":
        found = sidecar_text(path) or embedded_prompt(data)
        text = found[0] if found else None
    if text is not None and not normalise_caption(text):
        raise RsxError(f"{path}: the caption is blank")
    if role == "resynthesis" and text is None:
        raise RsxError(f"{path}: a resynthesis needs the caption it was made from")
    return (caption_hash(text), normalise_caption(text)) if text is not None else None


def load_file(
    job: FileJob,
    *,
    max_pixels: int,
    blobs: BlobStore,
    transform: Any = None,
    keep_image: bool = True,
    read: Callable[..., LoadedImage] = load_image_file,
) -> FileLoad:
    """Load one file (see the module notes); failures come back in ``failure``. ``read`` reads,
    hashes and decodes it (``load_image_file``, or a stand-in of the caller's)."""
    try:
        before = stat_or_none(job.path)
        loaded = read(job.path, max_pixels=max_pixels)
        caption = caption_for(job.path, job.role, job.caption, loaded.data)
        result = FileLoad(image=loaded, caption=caption, pid=os.getpid())
        if before is not None and before == stat_or_none(job.path):  # not changed while read
            result.before = before
        if transform is not None:
            picture = loaded.image if loaded.image.mode == "RGB" else loaded.image.convert("RGB")
            result.pixels = transform(picture).numpy()
        if job.write_blob:  # last: a load that fails leaves no temporary file behind
            result.staged = blobs.stage(loaded.sha256, loaded.data)
        if not keep_image:  # the decoded picture stays here; the consumer decodes it if need be
            result.image = LoadedImage(
                loaded.sha256,
                loaded.data,
                loaded.format,
                loaded.width,
                loaded.height,
                None,  # type: ignore[arg-type]
            )
        return result
    except RsxError as error:
        return FileLoad(failure=str(error).removeprefix(f"{job.path}: "), pid=os.getpid())


def stat_or_none(path: Path) -> FileStat | None:
    """The file's stat, to remember its digest by; None when it cannot be taken."""
    try:
        return file_stat(path)
    except OSError:
        return None


# ------------------------------------------------------------------------- how many workers
def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_workers(requested: int | None, files: int, cores: int | None = None) -> int:
    """How many worker processes load ``files`` files: 0 means the loader thread.

    ``requested`` (``--workers N``) is followed as given (0: the thread), never more workers
    than files. ``None`` (auto): one core is left for the ingest's own process, and workers run
    only when at least ``AUTO_MIN_WORKERS`` cores remain, each with ``MIN_FILES_PER_WORKER``
    files or more to load; otherwise the thread, which starts at once.
    """
    if requested is not None:
        if requested < 0:
            raise RsxError(f"--workers must be 0 or more, not {requested}")
        return min(requested, files)
    spare = (cores or usable_cores()) - 1
    if spare < AUTO_MIN_WORKERS:
        return 0
    workers = min(spare, files // MIN_FILES_PER_WORKER)
    return workers if workers >= AUTO_MIN_WORKERS else 0


def transform_for_workers(embedder: Any) -> Any:
    """The embedder's preprocess transform when worker processes can run it (it pickles and the
    embedder takes preprocessed tensors), else None: then the loader thread serves."""
    transform = getattr(embedder, "preprocess", None)
    if transform is None or not hasattr(embedder, "embed_tensors"):
        return None
    try:
        pickle.dumps(transform)
    except Exception:  # a lambda, a local class: it cannot reach another process
        return None
    return transform


# ------------------------------------------------------------------------- the worker pool
_worker: dict[str, Any] = {}  # in a worker process: what ``_init_worker`` was given


def _init_worker(max_pixels: int, blob_root: str, transform: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the ingest process's to handle
    try:
        import torch

        torch.set_num_threads(1)  # many workers: one thread each, no oversubscription
    except ImportError:  # pragma: no cover
        pass
    _worker.update(max_pixels=max_pixels, blobs=BlobStore(Path(blob_root)), transform=transform)


def _load_chunk(jobs: Sequence[FileJob]) -> list[FileLoad]:
    return [
        load_file(
            job,
            max_pixels=_worker["max_pixels"],
            blobs=_worker["blobs"],
            transform=_worker["transform"],
            keep_image=False,
        )
        for job in jobs
    ]


def _context() -> Any:
    """forkserver where the platform has it (its server imports torch once, and each worker is
    forked from it, never from this process and its threads), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


class PendingLoad(NamedTuple):
    """A batch's files submitted to the pool: one future per chunk, in order."""

    futures: list[Future]


class LoadingPool:
    """``workers`` processes running ``load_file``; a batch is split into one chunk per worker."""

    def __init__(
        self, workers: int, *, max_pixels: int, blob_root: Path, transform: Any = None
    ) -> None:
        if workers < 1:
            raise ValueError("a loading pool needs at least one worker")
        self.workers = workers
        context = _context()
        if context.get_start_method() == "forkserver":
            # imported once in the server, so each worker forked from it starts at once
            context.set_forkserver_preload(["resynth_index.pipeline.loading", "torchvision"])
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(max_pixels, str(blob_root), transform),
        )

    def submit(self, jobs: Sequence[FileJob]) -> PendingLoad:
        """Start loading ``jobs`` (in ``workers`` contiguous chunks)."""
        size = max(1, -(-len(jobs) // self.workers))
        try:
            futures = [
                self._pool.submit(_load_chunk, list(jobs[start : start + size]))
                for start in range(0, len(jobs), size)
            ]
        except BrokenProcessPool as error:
            raise _died(error) from None
        return PendingLoad(futures)

    def result(self, pending: PendingLoad, stop: threading.Event) -> list[FileLoad] | None:
        """The loads of a submitted batch, in order; None when ``stop`` was set meanwhile.
        A worker that died raises ``WorkerDied``."""
        waiting = set(pending.futures)
        while waiting:
            if stop.is_set():
                return None
            _done, waiting = wait(waiting, timeout=0.1, return_when=FIRST_EXCEPTION)
            if any(f.done() and f.exception() is not None for f in pending.futures):
                break
        loads: list[FileLoad] = []
        for future in pending.futures:
            try:
                loads.extend(future.result())
            except BrokenProcessPool as error:
                raise _died(error) from None
        return loads

    def close(self) -> None:
        """Stop the workers: what is queued is dropped, what runs finishes first."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _died(error: BaseException) -> WorkerDied:
    return WorkerDied(
        f"an ingest worker process died ({error}); the batch it was loading stored nothing:"
        " rerun the same command to continue (--workers 0 loads on a thread instead)"
    )
