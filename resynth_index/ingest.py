"""Bringing images into a lab: files, folders, manifests and the paper's dataset layout.

Ingest is idempotent by content hash and resumable: each batch is stored (blobs, rows, then
embeddings) before the next begins, and what already landed is skipped on a re-run. A bad file
fails alone with one line naming it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from resynth_index.captions import caption_hash, normalise_caption, sidecar_text
from resynth_index.errors import RsxError
from resynth_index.images import IMAGE_SUFFIXES, LoadedImage, load_image_file
from resynth_index.intake import ensure_embeddings, store_image
from resynth_index.metadata import embedded_prompt
from resynth_index.store import repository

if TYPE_CHECKING:
    import PIL.Image

    from resynth_index.lab import Lab

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


@dataclass
class IngestSummary:
    added: int = 0
    skipped: int = 0
    failures: list[IngestFailure] = field(default_factory=list)
    generators_added: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)


# ------------------------------------------------------------------------- item sources
def expand_paths(
    paths: Iterable[Path],
    *,
    role: str = "query",
    generator: str | None = None,
    caption: str | None = None,
) -> Iterator[IngestItem | IngestFailure]:
    """Images as given, folders walked recursively (sorted), manifests read line by line."""
    for path in paths:
        path = Path(path)
        if path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            yield from read_manifest(path)
        elif path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES:
            for child in sorted(path.rglob("*")):
                if child.suffix.lower() in IMAGE_SUFFIXES and not child.is_dir():
                    yield IngestItem(child, role, generator, caption)
        else:  # a file, or something that only looks like one: loading will say what is wrong
            yield IngestItem(path, role, generator, caption)


def read_manifest(manifest: Path) -> Iterator[IngestItem | IngestFailure]:
    """CSV (with a header) or JSON lines with path, role, generator, caption, seed."""
    base = manifest.parent
    try:
        if manifest.suffix.lower() == ".csv":
            with open(manifest, newline="", encoding="utf-8") as handle:
                records = list(csv.DictReader(handle))
            numbered = enumerate(records, start=2)
        else:
            lines = manifest.read_text(encoding="utf-8").splitlines()
            numbered = (
                (n, _json_record(line)) for n, line in enumerate(lines, start=1) if line.strip()
            )
        for line_number, record in numbered:
            where = f"{manifest.name}:{line_number}"
            try:
                yield _manifest_item(record, base)
            except (RsxError, ValueError, TypeError) as error:
                yield IngestFailure(where, str(error))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        yield IngestFailure(str(manifest), f"cannot read manifest: {error}")


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


# ------------------------------------------------------------------------- the ingest loop
def ingest(
    lab: Lab,
    items: Iterable[IngestItem | IngestFailure],
    *,
    batch_size: int | None = None,
    register_missing_as_imported: bool = False,
    progress: Callable[[int], None] | None = None,
    on_failure: Callable[[IngestFailure], None] | None = None,
) -> IngestSummary:
    """Store every item, batch by batch; failures are collected, never raised."""
    batch_size = batch_size or lab.settings.embedding_batch_size
    summary = IngestSummary()
    batch: list[IngestItem] = []

    def fail(failure: IngestFailure) -> None:
        summary.failures.append(failure)
        if on_failure:
            on_failure(failure)

    def flush() -> None:
        _ingest_batch(lab, batch, summary, fail, register_missing_as_imported)
        if progress:
            progress(len(batch))
        batch.clear()

    for item in items:
        if isinstance(item, IngestFailure):
            fail(item)
            if progress:
                progress(1)
            continue
        batch.append(item)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    lab.sync_index()
    return summary


def _ingest_batch(lab, batch, summary, fail, register_missing) -> None:
    pictures: dict[int, PIL.Image.Image] = {}
    for item in batch:
        try:
            loaded = load_image_file(item.path, max_pixels=lab.settings.max_pixels)
            generator, caption = _resolve(lab, item, loaded, summary, register_missing)
            image_id, new_image = store_image(lab, loaded)
            new_role = _record_role(lab, item, image_id, generator, caption)
        except RsxError as error:
            fail(IngestFailure(str(item.path), str(error).removeprefix(f"{item.path}: ")))
            continue
        pictures[image_id] = loaded.image
        if new_image or new_role:
            summary.added += 1
        else:
            summary.skipped += 1
    ensure_embeddings(lab, pictures)


def _resolve(lab, item: IngestItem, loaded: LoadedImage, summary, register_missing):
    """The generator row and the caption (hash, text) an item needs for its role."""
    generator = None
    if item.role in ("resynthesis", "reference"):
        if not item.generator:
            raise RsxError(f"{item.path}: a {item.role} needs a generator")
        with lab.session() as session:
            generator = repository.generator_by_name(session, item.generator)
        if generator is None and register_missing:
            generator = lab.add_generator(item.generator, "imported")
            summary.generators_added.append(item.generator)
        if generator is None:
            raise RsxError(
                f"{item.path}: unknown generator {item.generator!r}; add it with"
                " 'rsx generator add'"
            )
    text = item.caption
    if text is None and item.role != "query":
        found = sidecar_text(item.path) or embedded_prompt(loaded.data)
        text = found[0] if found else None
    if text is not None and not normalise_caption(text):
        raise RsxError(f"{item.path}: the caption is blank")
    if item.role == "resynthesis" and text is None:
        raise RsxError(f"{item.path}: a resynthesis needs the caption it was made from")
    caption = (caption_hash(text), normalise_caption(text)) if text is not None else None
    return generator, caption


def _record_role(lab, item: IngestItem, image_id: int, generator, caption) -> bool:
    with lab.session() as session:
        if caption is not None:
            repository.ensure_caption(session, caption[0], caption[1])
        if item.role == "reference":
            return repository.ensure_reference(
                session,
                image_id=image_id,
                generator_id=generator.id,
                caption_hash=caption[0] if caption else None,
            )
        if item.role == "resynthesis":
            settings_hash = lab.settings_hash(generator)
            if repository.resynthesis_image_for(
                session,
                generator_id=generator.id,
                caption_hash=caption[0],
                settings_hash=settings_hash,
                image_id=image_id,
            ):
                return False
            seed = item.seed
            if seed is None:
                if generator.kind != "imported":
                    raise RsxError(
                        f"{item.path}: a resynthesis for runnable generator {generator.name!r}"
                        " needs its seed"
                    )
                seed = repository.next_free_seed(session, generator.id, caption[0], settings_hash)
            return repository.ensure_resynthesis(
                session,
                image_id=image_id,
                generator_id=generator.id,
                caption_hash=caption[0],
                seed=seed,
                settings_hash=settings_hash,
            )
        return False
