"""What an ingest is asked to store: items from files, folders, manifests and the paper's dataset.

An ``IngestItem`` is one file with its role (query, reference, resynthesis), generator, caption
and seed; an ``IngestFailure`` a path or manifest line that cannot be one, with its one line.
Paths that name nothing (a missing file, an empty folder, a shell pattern that matched
nothing), manifest lines that cannot be read and work-order rows whose ``caption_hash`` no
longer matches their caption are failures here, found without decoding an image.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from resynth_index.errors import RsxError
from resynth_index.media.captions import caption_hash, sidecar_text
from resynth_index.media.folders import walk_files
from resynth_index.media.images import IMAGE_SUFFIXES
from resynth_index.pipeline.work_orders import restore_cell

ROLES = ("query", "resynthesis", "reference")


MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class IngestItem:
    path: Path
    role: str = "query"
    generator: str | None = None
    caption: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class IngestFailure:
    path: str
    reason: str


#: The reason of an ``IngestFailure`` for a folder holding no image file.
NO_IMAGES_IN_FOLDER = "no images found in this folder"


#: The reason of an ``IngestFailure`` for a shell pattern (passed on unexpanded) matching nothing.
NO_IMAGES_MATCH = "no images found matching this pattern"


#: The reason of an ``IngestFailure`` for a work-order row whose caption was edited.
CAPTION_HASH_MISMATCH = "caption_hash does not match the caption text; was the caption edited?"


_GLOB_CHARACTERS = frozenset("*?[")


# ------------------------------------------------------------------------- item sources
def expand_paths(
    paths: Iterable[Path],
    *,
    role: str = "query",
    generator: str | None = None,
    caption: str | None = None,
    seed: int | None = None,
) -> Iterator[IngestItem | IngestFailure]:
    """Images as given, folders walked recursively (sorted), manifests read line by line.

    A folder walk follows links but enters each real directory once (``walk_files``): a link
    cycle ends, and a folder that cannot be listed is one failure line, as is a folder without
    any image (``NO_IMAGES_IN_FOLDER``), a path that does not exist, and a shell pattern that
    reached us unexpanded because it matched nothing (``NO_IMAGES_MATCH``).
    """
    for path in paths:
        path = Path(path)
        like = IngestItem(path, role, generator, caption, seed)
        if path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            yield from read_manifest(path)
        elif path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES:
            found = _folder_items(path, like)
            if not any(isinstance(item, IngestItem) for item in found):
                found.append(IngestFailure(str(path), NO_IMAGES_IN_FOLDER))
            yield from found
        elif not path.exists() and not path.is_symlink():
            pattern = _GLOB_CHARACTERS.intersection(str(path))
            yield IngestFailure(str(path), NO_IMAGES_MATCH if pattern else "no such file or folder")
        else:  # a file, or something that only looks like one: loading will say what is wrong
            yield like


def _folder_items(folder: Path, like: IngestItem) -> list[IngestItem | IngestFailure]:
    """The images under ``folder`` (sorted), each an item like ``like``; unlistable folders."""
    found: list[IngestItem | IngestFailure] = []

    def unlistable(where: Path, error: OSError) -> None:
        found.append(IngestFailure(str(where), f"cannot list folder: {error.strerror or error}"))

    for child in sorted(walk_files(folder, on_error=unlistable)):
        if child.suffix.lower() in IMAGE_SUFFIXES:
            found.append(replace(like, path=child))
    return found


def read_manifest(manifest: Path) -> Iterator[IngestItem | IngestFailure]:
    """CSV (with a header) or JSON lines with path, role, generator, caption, seed."""
    base = manifest.parent
    try:
        if manifest.suffix.lower() == ".csv":
            with open(manifest, newline="", encoding="utf-8") as handle:
                records = [_restore_cells(record) for record in csv.DictReader(handle)]
            numbered: Iterable[tuple[int, dict]] = enumerate(records, start=2)
        else:
            lines = manifest.read_text(encoding="utf-8").splitlines()
            numbered = (
                (n, _json_record(line)) for n, line in enumerate(lines, start=1) if line.strip()
            )
        for line_number, record in numbered:
            where = f"{manifest.name}:{line_number}"
            try:
                _check_caption_hash(record)
                yield _manifest_item(record, base)
            except (RsxError, ValueError, TypeError) as error:
                yield IngestFailure(where, str(error))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        yield IngestFailure(str(manifest), f"cannot read manifest: {error}")


def _restore_cells(record: dict) -> dict:
    """A CSV row with the formula guard of an exported work order undone (``restore_cell``)."""
    for key in ("caption", "generator"):
        if isinstance(record.get(key), str):
            record[key] = restore_cell(record[key])
    return record


def _check_caption_hash(record: dict) -> None:
    """A row that carries a ``caption_hash`` (as an exported work order does) must carry the
    caption that hash was made from: an edited caption would be ingested as another caption,
    and the work order would stay open. Refused with ``CAPTION_HASH_MISMATCH``."""
    expected = record.get("caption_hash")
    if expected is None or (isinstance(expected, str) and not expected.strip()):
        return
    text = record.get("caption")
    if not isinstance(expected, str) or not isinstance(text, str):
        raise ValueError(CAPTION_HASH_MISMATCH)
    if caption_hash(text) != expected.strip().lower():
        raise ValueError(CAPTION_HASH_MISMATCH)


def _json_record(line: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError as error:
        return {"__error__": f"not JSON: {error}"}
    return record if isinstance(record, dict) else {"__error__": "a line is not a JSON object"}


def _manifest_item(record: dict, base: Path) -> IngestItem:
    if "__error__" in record:
        raise ValueError(record["__error__"])
    raw_path = (record.get("path") or "").strip()
    if not raw_path:
        raise ValueError("no 'path'")
    role = (record.get("role") or "query").strip()
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    seed = record.get("seed")
    seed = int(seed) if seed not in (None, "") else None
    path = Path(raw_path)
    return IngestItem(
        path=path if path.is_absolute() else base / path,
        role=role,
        generator=(record.get("generator") or "").strip() or None,
        caption=(record.get("caption") or None),
        seed=seed,
    )


def resynthesis_dataset(root: Path) -> Iterator[IngestItem | IngestFailure]:
    """The published resynthesis dataset's layout.

    ``<images>/<G>/000NN.ext`` is original NN of generator G (a reference of G);
    ``<images>/<G>/images/<R>/000NN.ext`` is its resynthesis by generator R. Both share one
    caption: the sidecar text of the original when present, else the identity
    ``resynthesis-dataset:<G>/000NN`` (the dataset pairs them by file name, not by text).
    """
    images = _dataset_images_dir(Path(root))
    for generator_dir in sorted(p for p in images.iterdir() if p.is_dir()):
        originals = sorted(
            p for p in generator_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        captions: dict[str, str] = {}
        for original in originals:
            found = sidecar_text(original)
            text = (
                found[0] if found else f"resynthesis-dataset:{generator_dir.name}/{original.stem}"
            )
            captions[original.stem] = text
            yield IngestItem(original, "reference", generator_dir.name, text)
        resynth_root = generator_dir / "images"
        if not resynth_root.is_dir():
            continue
        for maker_dir in sorted(p for p in resynth_root.iterdir() if p.is_dir()):
            for image in sorted(maker_dir.iterdir()):
                if image.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if image.stem not in captions:
                    yield IngestFailure(str(image), f"no original {image.stem} in {generator_dir}")
                    continue
                yield IngestItem(image, "resynthesis", maker_dir.name, captions[image.stem], 0)


def _dataset_images_dir(root: Path) -> Path:
    for candidate in (
        root / "Dataset" / "100people" / "images",
        root / "100people" / "images",
        root / "images",
        root,
    ):
        if candidate.is_dir() and any(
            (d / "images").is_dir() for d in candidate.iterdir() if d.is_dir()
        ):
            return candidate
    raise RsxError(f"{root} does not hold the resynthesis dataset layout (<gen>/images/<gen>/...)")
