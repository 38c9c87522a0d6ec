"""Advisory locks between the processes sharing a lab: ``flock`` on a directory.

Locking a directory rather than a sidecar file leaves nothing behind. The kernel drops a lock when
its process dies, so a crash never leaves one held. Where ``fcntl`` is missing (Windows) nothing is
serialised: every lock is granted at once; each write stays atomic on its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from resynth_index.errors import StoreError


@contextmanager
def directory_lock(directory: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold a shared or exclusive ``flock`` on ``directory`` (created if need be) for the block.

    With ``wait`` the call blocks until the lock is granted and yields True. Without it, it
    yields False at once when another holder is in the way (the block then runs unlocked and
    must act accordingly). Two holders in one process conflict like two processes do.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
    except OSError as error:
        raise StoreError(f"cannot lock directory {directory}: {error}") from None
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
            acquired = True
        except BlockingIOError:
            acquired = False
        yield acquired
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
