"""Storing generated batches (pipeline/batch_writer): the writer thread, Ctrl-C held back."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from resynth_index.pipeline.batch_writer import (
    BatchWriter,
    interrupts_deferred,
    stores_beside_generation,
)


def test_storing_runs_beside_an_accelerator_and_in_line_on_a_cpu():
    assert not stores_beside_generation("cpu")
    assert all(stores_beside_generation(device) for device in ("cuda", "cuda:1", "mps"))


def test_a_ctrl_c_in_the_block_is_raised_once_the_block_is_done(ctrl_c_raises):
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # handled before the next line: held back
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_back_ctrl_c_goes_to_the_handler_that_was_there_before(ctrl_c_raises):
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: seen.append(number))
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            assert seen == []
        assert seen == [signal.SIGINT]  # delivered once, after the block
        with interrupts_deferred():
            pass
        assert seen == [signal.SIGINT]  # nothing came: nothing delivered
    finally:
        signal.signal(signal.SIGINT, previous)


def test_off_the_main_thread_nothing_is_touched(ctrl_c_raises):
    handlers = []

    def run():
        with interrupts_deferred():
            handlers.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert handlers == [signal.default_int_handler]


def _held(done: list[int], value: int):
    """A batch's store that appends ``value`` to ``done`` once its event is set: (job, event)."""
    release = threading.Event()

    def job():
        assert release.wait(timeout=30), "never released"
        done.append(value)

    return job, release


def test_the_writer_stores_in_order_and_hands_back_a_failure():
    done: list[int] = []
    first, release_first = _held(done, 1)
    second, release_second = _held(done, 2)

    with BatchWriter() as writer:
        writer.submit(first)
        assert done == []  # handed over: the caller goes on while it is stored
        release_first.set()
        writer.submit(second)  # waits for the first
        assert done == [1]
        release_second.set()
    assert done == [1, 2]

    def broken():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BatchWriter() as writer:
            writer.submit(broken)
            writer.submit(lambda: done.append(3))  # the failure surfaces here; 3 is never run
    assert done == [1, 2]


def test_leaving_with_an_error_still_stores_the_batch_handed_over():
    done: list[int] = []
    slow, release = _held(done, 1)

    with pytest.raises(KeyboardInterrupt):
        with BatchWriter() as writer:
            writer.submit(slow)
            release.set()
            raise KeyboardInterrupt
    assert done == [1]
    assert not [t for t in threading.enumerate() if t.name == "rsx-batch-writer"]


def test_the_last_batch_failing_as_the_caller_leaves_with_its_own_error_is_not_lost(caplog):
    """The caller's error goes on (it is why the run stopped); the last batch's failure is logged
    in one line, with no traceback for a user error, and kept for the command's summary."""
    from resynth_index.errors import StoreError

    def broken():
        raise StoreError("the blob folder is read-only")

    with pytest.raises(KeyboardInterrupt):
        with BatchWriter() as writer:
            writer.submit(broken)
            raise KeyboardInterrupt
    assert isinstance(writer.lost_error, StoreError)
    [record] = [r for r in caplog.records if r.name == "resynth_index.pipeline.batch_writer"]
    assert record.levelname == "ERROR"
    assert record.getMessage() == "the last batch could not be stored: the blob folder is read-only"
    assert record.exc_info is None


def test_an_unexpected_failure_of_the_last_batch_is_logged_with_its_traceback(caplog):
    def broken():
        raise OSError("disk full")

    with pytest.raises(ValueError, match="the caller's"):
        with BatchWriter() as writer:
            writer.submit(broken)
            raise ValueError("the caller's")
    assert isinstance(writer.lost_error, OSError)
    [record] = [r for r in caplog.records if r.name == "resynth_index.pipeline.batch_writer"]
    assert record.getMessage() == "the last batch could not be stored: disk full"
    assert record.exc_info is not None and record.exc_info[1] is writer.lost_error


def test_nothing_is_lost_or_logged_when_the_last_batch_was_stored(caplog):
    done: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        with BatchWriter() as writer:
            writer.submit(lambda: done.append(1))
            raise KeyboardInterrupt
    assert done == [1] and writer.lost_error is None
    assert not [r for r in caplog.records if r.name == "resynth_index.pipeline.batch_writer"]
