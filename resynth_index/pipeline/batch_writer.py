"""Storing generated batches: beside the generation of the next batch, or in line before it.

``stores_beside_generation`` chooses, by the device the generator runs on. Beside: ``BatchWriter``
runs each batch's store (PNG encoding, hashing, the blobs, the rows, the embedder's forward) on
its own thread, one batch at a time and in generation order, while the caller generates the
next. In line: the caller stores the batch itself, inside ``interrupts_deferred``, so that a
Ctrl-C meanwhile is raised only once the batch is stored whole. Either way an interrupted run
keeps every batch it generated, and a batch that could not be stored is never passed over in
silence.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from resynth_index.errors import RsxError

logger = logging.getLogger(__name__)


def stores_beside_generation(device: str) -> bool:
    """Whether a generated batch is stored while the next batch is generated on ``device`` (a
    concrete device name), rather than in line before it is begun.

    Beside an accelerator, yes: the host's cores are free while it denoises, so PNG encoding,
    hashing, the database and the embedder's forward cost the generation nothing. On a CPU, no:
    torch's intra-op threads already hold every core, and a second thread running torch beside
    them (or even after them, while they wait) slows the generation far beyond the store's own
    work. Measured on the 2-core VM (toy zoo, batch 4, 32 images a round, medians of 3
    interleaved rounds in one process): storing beside generation ran at 0.55-0.63 of bare
    generation, storing on the writer thread while the caller waited at 0.71, storing on the
    caller's own thread at 0.89-0.97.
    """
    return device != "cpu"


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) while the block runs; one that came is delivered as it ends, to
    the handler that was in place before (a KeyboardInterrupt, by default). Signals reach only
    the main thread, so elsewhere this holds nothing back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


class BatchWriter:
    """Stores generated batches on one thread, in the order they are submitted.

    ``submit`` first waits for the batch before (re-raising its error, if it failed), so one
    batch at most is being stored; ``wait`` waits for it. The thread starts with the writer, not
    with the first batch, so a Ctrl-C can never fall between handing a batch over and a thread
    being there to store it. Leaving the ``with`` block lets the thread finish every batch handed
    to it, also when the caller leaves with an error or Ctrl-C (which reaches the caller, never
    this thread): a batch that was generated is stored, never lost, before the error goes on.

    Should that last batch fail to be stored while the caller leaves with its own error, the
    caller's error is the one that goes on (it is why the run stopped), and the batch's is
    logged and kept in ``lost_error``, so that the command's summary can say the last batch
    could not be stored (its resyntheses are missing: a rerun makes them).
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        #: The last batch's error, when the caller left the block with an error of its own.
        self.lost_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rsx-batch-writer")
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as error:  # noqa: BLE001 - handed to the caller by ``wait``
                self._error = error
            finally:
                self._idle.set()

    def submit(self, job: Callable[[], None]) -> None:
        """Store a batch (``job``) on the thread, once the batch before is stored."""
        self.wait()
        self._idle.clear()
        self._jobs.put(job)

    def wait(self) -> None:
        """Wait for the batch being stored; its error, if any, is raised here."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        self._jobs.put(None)  # after every batch handed over: the thread stores them, then ends
        self._thread.join()
        if kind is None:
            self.wait()  # the last batch's error
        else:
            self._keep_lost_error()  # the caller's own error goes on

    def _keep_lost_error(self) -> None:
        """Log the last batch's error, if any, and keep it in ``lost_error``: the caller is
        leaving with its own error, which is the one raised, but this one must not vanish (a
        user error in one line, anything else with its traceback)."""
        error, self._error = self._error, None
        if error is None:
            return
        self.lost_error = error
        logger.error(
            "the last batch could not be stored: %s",
            str(error) or type(error).__name__,
            exc_info=None if isinstance(error, RsxError) else error,
        )
