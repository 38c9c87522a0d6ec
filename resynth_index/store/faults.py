"""Crash points: where a test may kill this process to prove a crash loses nothing committed.

Set ``RSX_CRASH_AT=POINT:N`` and the process kills itself with SIGKILL the N-th time it reaches
``crash_point(POINT)``. Unset (always, outside the crash tests), a crash point costs one dict
lookup. The points sit where a real crash hurts most: a blob half-written, rows written but not
embedded, an index file half-saved.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "RSX_CRASH_AT"
POINTS = ("blob-write", "image-row", "embedding", "index-save")
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Kill this process here if ``RSX_CRASH_AT`` names this point and its count is reached."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
