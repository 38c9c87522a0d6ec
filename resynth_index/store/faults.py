"""Crash points: where a test may kill this process to prove a crash loses nothing committed.

Set ``RSX_CRASH_AT=POINT:N`` and the process kills itself with SIGKILL the N-th time it reaches
``crash_point(POINT)``. Unset (always, outside the crash tests), a crash point costs one dict
lookup. The points sit where a real crash hurts most: a blob half-written, rows written but not
embedded, an index file half-saved.

The same points can hold the process instead: with ``RSX_HOLD_AT=POINT:N:FILE`` it writes FILE
the N-th time it reaches POINT and waits there until FILE is removed, so that a test can break
something outside (stop the database server, fill the disk) at exactly that step, then let the
command meet the fault.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CRASH_ENV = "RSX_CRASH_AT"
HOLD_ENV = "RSX_HOLD_AT"
HOLD_LIMIT_S = 300.0  # a test that never lets go: the process goes on rather than hang forever
POINTS = ("blob-write", "image-row", "embedding", "index-save")
_reached: dict[str, int] = {}


_held: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Kill this process here if ``RSX_CRASH_AT`` names this point and its count is reached;
    hold it here if ``RSX_HOLD_AT`` does."""
    if os.environ.get(HOLD_ENV):
        _hold(name, os.environ[HOLD_ENV])
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _hold(name: str, spec: str) -> None:
    """Write the hold file and wait until it is removed, the N-th time ``name`` is reached."""
    point, _, rest = spec.partition(":")
    nth, _, file = rest.partition(":")
    if point != name or not file:
        return
    _held[name] = _held.get(name, 0) + 1
    if _held[name] != int(nth or 1):
        return
    marker = Path(file)
    marker.write_text(str(os.getpid()), encoding="utf-8")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
