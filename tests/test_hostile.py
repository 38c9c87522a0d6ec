"""Hostile inputs: every bad file fails alone with one line; good ones land; nothing else does.

The batch (tests/hostile_files.py) mixes plain images with 22 kinds of bad or unusual input. We run
as root in CI, where ``chmod 000`` does not stop a read: the unreadable file is then simulated by
making the loader's ``open`` raise the PermissionError the OS would (see ``make_unreadable``).
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
from hostile_files import (
    MAX_PIXELS,
    UNREADABLE,
    Hostile,
    exif_rotated_jpeg,
    file_sha,
    good_images,
    rsx,
    store_state,
    write_hostile_files,
)

from resynth_index.config import LabSettings
from resynth_index.lab import Lab

pytestmark = pytest.mark.slow  # end to end through the CLI: not in the quick loop

CAPTION = "a lighthouse at dusk"


@pytest.fixture
def lab(toy_lab: Path) -> Path:
    """The toy lab with a small pixel limit and an imported generator 'imp'."""
    settings = LabSettings.load(toy_lab)
    settings.max_pixels = MAX_PIXELS
    settings.save(toy_lab)
    with Lab.open(toy_lab) as opened:
        opened.add_generator("imp", "imported")
    return toy_lab


def make_unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000; where that does not stop us (root), the loader's open() is denied instead."""
    path.chmod(0)
    try:
        path.read_bytes()
    except PermissionError:
        return
    import resynth_index.media.images as images_module

    def guarded_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(images_module, "open", guarded_open, raising=False)


def batch(tmp_path: Path, monkeypatch) -> tuple[list[Path], list[Path], list[Hostile]]:
    """(arguments in a mixed order, files that must be stored, files that must be refused)."""
    hostile = write_hostile_files(tmp_path / "hostile")
    make_unreadable(next(h.path for h in hostile if h.path.name == UNREADABLE), monkeypatch)
    good = good_images(tmp_path / "good", 3)
    arguments = [good[0], *[h.path for h in hostile[:12]], good[1], *[h.path for h in hostile[12:]]]
    arguments.append(good[2])
    accepted = good + [h.path for h in hostile if h.ok]
    refused = [h for h in hostile if not h.ok]
    assert len(hostile) >= 15 and len(refused) >= 10 and len(accepted) >= 10
    return arguments, accepted, refused


def assert_one_line_each(stderr: str, refused: list[Hostile]) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("failed: ")]
    assert len(lines) == len(refused), stderr
    for item in refused:
        mine = [line for line in lines if line.startswith(f"failed: {item.path}: ")]
        assert len(mine) == 1, f"{item.kind}: {lines}"
        assert item.reason in mine[0].lower(), f"{item.kind}: {mine[0]}"


def assert_nothing_from(refused: list[Hostile], state) -> None:
    """No row and no blob holds the bytes of a refused file (those that have bytes)."""
    for item in refused:
        if item.path.is_file() and not item.path.is_symlink() and item.path.name != UNREADABLE:
            sha = file_sha(item.path)
            assert sha not in state.images and sha not in state.blobs, item.kind
    assert state.blobs == state.images  # no orphan blob, no row without its blob
    assert state.embeddings == state.embedded_images == len(state.images)


def test_ingest_of_a_hostile_batch(lab, tmp_path, monkeypatch):
    arguments, accepted, refused = batch(tmp_path, monkeypatch)
    before = store_state(lab)
    result = rsx(lab, "ingest", *map(str, arguments))

    assert result.exit_code == 1
    assert_one_line_each(result.stderr, refused)
    assert (
        f"ingest: {len(accepted)} added, 0 skipped (already present), {len(refused)} failed"
        in result.stdout
    )
    after = store_state(lab)
    unreadable = next(h.path for h in refused if h.path.name == UNREADABLE)
    monkeypatch.undo()  # the unreadable file may now be hashed, to prove it was not stored
    unreadable.chmod(0o644)
    assert after.images - before.images == {file_sha(p) for p in accepted}
    assert file_sha(unreadable) not in after.images | after.blobs
    assert_nothing_from(refused, after)
    check = rsx(lab, "check")
    assert check.exit_code == 0, check.output


def test_query_of_a_hostile_batch(lab, tmp_path, monkeypatch):
    [resynthesis] = good_images(tmp_path / "imp", 1, seed=900)
    stored = rsx(
        lab, "ingest", str(resynthesis), "--role", "resynthesis", "--generator", "imp",
        "--caption", CAPTION,
    )  # fmt: skip
    assert stored.exit_code == 0, stored.output
    arguments, accepted, refused = batch(tmp_path, monkeypatch)
    before = store_state(lab)

    result = rsx(
        lab, "query", *map(str, arguments), "--caption", CAPTION, "--candidates", "imp",
        "--no-generate", "--json",
    )  # fmt: skip
    assert result.exit_code == 1
    # rsx query skips text files silently (they are sidecars next to images, as in `query DIR/*`)
    texts = [h for h in refused if h.path.suffix == ".txt"]
    assert texts, "the hostile batch holds a text file"
    refused = [h for h in refused if h not in texts]
    arguments = [p for p in arguments if p not in {h.path for h in texts}]
    assert_one_line_each(result.stderr, refused)
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["image"] for a in answers] == [str(p) for p in arguments]
    by_image = {a["image"]: a for a in answers}
    for item in refused:
        answer = by_image[str(item.path)]
        assert set(answer) == {"image", "error"} and item.reason in answer["error"].lower()
        assert "\n" not in answer["error"]
    for path in accepted:
        answer = by_image[str(path)]
        assert answer["verdict"] == "imp" and answer["sha256"] == file_sha(path)

    after = store_state(lab)
    monkeypatch.undo()
    assert after.images - before.images == {file_sha(p) for p in accepted}
    assert after.queries - before.queries == len(accepted)
    assert_nothing_from(refused, after)
    check = rsx(lab, "check")
    assert check.exit_code == 0, check.output


def test_exif_rotation_is_applied_before_embedding(lab, tmp_path):
    from PIL import Image
    from sqlalchemy import select

    from resynth_index.store.models import EmbeddingRow, ImageRow

    data, upright = exif_rotated_jpeg(12)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    assert rsx(lab, "ingest", str(path)).exit_code == 0
    as_stored = Image.open(path).convert("RGB")  # the pixels as written, sideways
    assert as_stored.size == (40, 24) and upright.size == (24, 40)
    with Lab.open(lab) as opened:
        with opened.session() as session:
            blob = session.scalar(
                select(EmbeddingRow.vector)
                .join(ImageRow, ImageRow.id == EmbeddingRow.image_id)
                .where(ImageRow.sha256 == file_sha(path))
            )
        stored = np.frombuffer(blob, dtype="<f4")
        expected, sideways = opened.embedder.embed([upright, as_stored])
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    assert not np.allclose(stored, sideways, atol=1e-3)
