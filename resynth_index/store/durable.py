"""Durable renames: after ``os.replace`` the directory entry itself must reach the disk.

``fsync_directories`` makes many renames durable at once, each distinct directory fsynced once:
a batch of blobs pays one fsync per directory it touched, not one per blob. Every directory
fsync goes through ``fsync_directory`` (a module attribute), so a test can count them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a rename durable; platforms that cannot open directories skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_directories(directories: Iterable[Path]) -> int:
    """``fsync_directory`` each distinct directory once, deepest first (a directory created
    under another is durable before the entry naming it is); how many were fsynced."""
    distinct = sorted({Path(d) for d in directories}, key=lambda d: (-len(d.parts), str(d)))
    for directory in distinct:
        fsync_directory(directory)
    return len(distinct)


def fsync_file_data(fd: int) -> None:
    """Flush a file's bytes (and the size needed to read them back) to the disk."""
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fd)
