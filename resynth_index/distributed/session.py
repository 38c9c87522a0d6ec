"""Joining and leaving Ray, quietly: a cluster's address or a Ray of this process's own, and
nothing of Ray on stdout (which holds only what rsx prints: ``--json`` lines)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import Any

from resynth_index.errors import RsxError

logger = logging.getLogger(__name__)


#: Ray's switch for logging to the terminal (see ``_ray_log_in_files``).
RAY_LOG_TO_STDERR = "RAY_LOG_TO_STDERR"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run goes.

    ``address`` None starts a Ray for this process alone (stopped at the end); ``"auto"`` joins
    the cluster this node belongs to; anything else is a cluster address (``host:port`` or
    ``ray://host:port``). ``actors`` is the pool size per generator; None sizes it to the
    cluster (its GPUs, else its CPUs), never more than the generator has tasks.
    """

    address: str | None = None
    actors: int | None = None
    num_cpus: int | None = None  # only when starting a local Ray


def require_ray() -> Any:
    """The ray module, or a clear error naming the extra that brings it."""
    try:
        import ray
    except ImportError:
        raise RsxError("the ray executor needs Ray: pip install 'resynth-index[scale]'") from None
    return ray


def join_ray(options: RayOptions) -> bool:
    """Join the cluster ``options`` names, or start a local Ray; True when this call started
    one (its owner shuts it down, ``leave_ray``). A process already connected stays as it is.

    Nothing Ray says reaches stdout, which holds only what rsx prints (``--json``: JSON lines):
    the actors' output stays on their nodes (``log_to_driver``), the driver's Python log goes
    to stderr, its C++ log to Ray's files (``_ray_log_in_files``), and the rest is sent to
    stderr while Ray starts (``stdout_to_stderr``)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if options.address is None:
        if options.num_cpus is not None:
            kwargs["num_cpus"] = options.num_cpus
    else:
        kwargs["address"] = options.address
    try:
        with stdout_to_stderr(), _ray_log_in_files():
            ray.init(**kwargs)
    except ConnectionError as error:
        raise RsxError(f"cannot reach the Ray cluster at {options.address}: {error}") from None
    return options.address is None


def leave_ray() -> None:
    """Disconnect from Ray, stopping the local Ray this process started; as quiet on stdout as
    ``join_ray``."""
    with stdout_to_stderr():
        require_ray().shutdown()


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """While the block runs, what this process writes to stdout goes to stderr: Python's
    ``sys.stdout``, and file descriptor 1 itself, which the processes started meanwhile inherit.

    Ray prints to stdout in ways ``log_to_driver`` does not stop: a ``print`` in some builds (the
    usage-stats notice of a nightly wheel), and every line of the processes a local Ray starts
    (the GCS server, the raylet, and the workers the raylet starts later) where they keep their
    parent's stdout rather than Ray's log files (they do under ``RAY_LOG_TO_STDERR=1``, which
    ``_ray_log_in_files`` takes away). Only while Ray starts or stops: another thread's output
    to stdout meanwhile goes to stderr too (rsx prints its results once the work is done).
    """
    for stream in (sys.stdout, sys.__stdout__):
        if stream is not None:
            stream.flush()  # what was printed before stays first on stdout
    saved = _point_stdout_at_stderr()
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


@contextmanager
def _ray_log_in_files() -> Iterator[None]:
    """While Ray starts, without ``RAY_LOG_TO_STDERR``: Ray's C++ parts (this process's core
    worker, and the GCS server and raylet of a local Ray) would obey it by writing their log to
    stdout (Ray 2.60 does, for the whole session, so no redirection while Ray starts can help).
    Their log stays in Ray's files; a warning says so."""
    value = os.environ.pop(RAY_LOG_TO_STDERR, None)
    if value is not None and value.strip() not in ("", "0"):
        logger.warning(
            "%s is ignored: Ray would write its log to stdout, which holds only what rsx "
            "prints; it stays in Ray's log files (/tmp/ray/session_latest/logs)",
            RAY_LOG_TO_STDERR,
        )
    try:
        yield
    finally:
        if value is not None:
            os.environ[RAY_LOG_TO_STDERR] = value


def _point_stdout_at_stderr() -> int | None:
    """Make file descriptor 1 a copy of 2; a copy of what 1 was, to put back (None, touching
    nothing, where this process has no such descriptors)."""
    try:
        saved = os.dup(1)
    except OSError:
        return None
    try:
        os.dup2(2, 1)
    except OSError:
        os.close(saved)
        return None
    return saved


def ray_cause(error: Any) -> str:
    """The last line of what a Ray error carries (its cause's message, for a task error)."""
    return str(getattr(error, "cause", None) or error).strip().splitlines()[-1]
