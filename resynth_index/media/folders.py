"""Walking folders the user points at, whatever links they hold.

Links are followed (a pipeline folder assembled from links to shared components, a dataset folder
that links in another, a Hugging Face snapshot whose files are links into a blob cache), but each
real directory, identified by ``(st_dev, st_ino)``, is entered at most once: a link back to a
parent (a cycle) is skipped instead of walked forever, and a directory reachable through two
links is listed once, under the first of its paths in sorted, depth-first order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def walk_files(
    root: str | os.PathLike[str],
    *,
    skip_hidden: bool = False,
    on_error: Callable[[Path, OSError], None] | None = None,
) -> list[Path]:
    """Every non-directory entry under ``root`` (links followed), sorted by relative path.

    Each real directory is entered once (see the module notes), so the walk ends and costs at
    most one visit per real directory. ``skip_hidden`` leaves out names starting with ".".
    An entry that cannot be inspected is reported as a file (reading it will say what is wrong,
    e.g. a dangling or looping link). A directory that cannot be listed goes to ``on_error``;
    without one, its ``OSError`` is raised.
    """
    root = Path(root)
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    stack: list[Path] = [root]
    while stack:
        folder = stack.pop()
        try:
            status = os.stat(folder)
            identity = (status.st_dev, status.st_ino)
            if identity in seen:
                continue
            seen.add(identity)
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            if on_error is None:
                raise
            on_error(folder, error)
            continue
        subfolders = []
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(Path(entry.path))
            else:
                found.append(Path(entry.path))
        stack.extend(reversed(subfolders))  # the first name is walked first
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())
