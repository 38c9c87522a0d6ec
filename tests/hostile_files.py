"""A batch of hostile and unusual inputs for the reliability tests (issue 6).

``write_hostile_files(folder)`` makes one file (or directory, link, pipe) per kind and returns a
``Hostile`` per kind: whether rsx must accept it (``ok``) or refuse it, and a fragment the one-line
refusal must contain. Accepted kinds each have their own pixels, so every one is a distinct image.
Pixel counts stay under ``MAX_PIXELS`` except the kinds meant to exceed it: the tests set the
lab's ``max_pixels`` to that value.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 10_000  # the lab limit the tests set: 100 x 100
UNREADABLE = "locked.png"


@dataclass(frozen=True)
class Hostile:
    kind: str
    path: Path
    ok: bool  # must be stored (True) or refused with one line (False)
    reason: str = ""  # for a refusal: a fragment of the reason, lower case


def noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Random pixels: no two seeds give the same image, and no image is symmetric."""
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    if mode == "LA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 2), dtype=np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels it does not contain."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _chunk(b"IEND", b"")
    )


def exif_rotated_jpeg(seed: int) -> tuple[bytes, Image.Image]:
    """A 40x24 JPEG tagged orientation 6 (rotate 90 clockwise to view); also what it decodes to."""
    stored = noise(40, 24, seed)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    return data, decoded.convert("RGB").transpose(Image.Transpose.ROTATE_270)


def good_images(folder: Path, count: int, seed: int = 100) -> list[Path]:
    """Plain, valid PNGs of random pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"good-{i}.png"
        noise(48, 48, seed + i).save(path)
        paths.append(path)
    return paths


def write_hostile_files(folder: Path) -> list[Hostile]:
    """Write every kind into ``folder``; the unreadable one is readable until a test locks it."""
    folder.mkdir(parents=True, exist_ok=True)
    made: list[Hostile] = []

    def put(kind: str, name: str, data: bytes, ok: bool, reason: str = "") -> None:
        path = folder / name
        path.write_bytes(data)
        made.append(Hostile(kind, path, ok, reason))

    png = encode(noise(64, 64, 1), "PNG")
    jpeg = encode(noise(64, 64, 2), "JPEG", quality=90)
    put("empty file", "empty.png", b"", False, "empty")
    put("truncated PNG", "cut.png", png[: len(png) // 2], False, "truncated")
    put("truncated JPEG", "cut.jpg", jpeg[: len(jpeg) // 2], False, "truncated")
    random_bytes = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    put("random bytes named .png", "noise.png", random_bytes, False, "not an image")
    put("text file", "notes.txt", b"not an image, just notes\n" * 10, False, "not an image")
    put(
        "decompression bomb",
        "bomb.png",
        png_declaring(100_000, 100_000),
        False,
        "decompression bomb",
    )
    put("over the pixel limit", "large.png", encode(noise(120, 120, 4), "PNG"), False, "limit")
    put("unsupported format (PPM)", "plain.ppm", encode(noise(8, 8, 5), "PPM"), False, "not an")

    put("1x1 image", "one-pixel.png", encode(noise(1, 1, 6), "PNG"), True)
    put("CMYK JPEG", "cmyk.jpg", encode(noise(32, 32, 7, "CMYK"), "JPEG", quality=95), True)
    wide = (np.random.default_rng(8).integers(0, 65536, (32, 32))).astype(np.uint16)
    put("16-bit PNG", "sixteen.png", encode(Image.fromarray(wide), "PNG"), True)
    palette = noise(32, 32, 9).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("palette with transparency", "palette.png", encode(palette, "PNG", transparency=0), True)
    put("greyscale with alpha", "grey-alpha.png", encode(noise(32, 32, 10, "LA"), "PNG"), True)
    frames = [noise(24, 24, 11 + i) for i in range(3)]
    put(
        "animated GIF",
        "animated.gif",
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        True,
    )
    webp_frames = [noise(24, 24, 21 + i) for i in range(3)]
    put(
        "animated WebP",
        "animated.webp",
        encode(webp_frames[0], "WEBP", save_all=True, append_images=webp_frames[1:], lossless=True),
        True,
    )
    put("EXIF-rotated JPEG", "rotated.jpg", exif_rotated_jpeg(12)[0], True)
    put(
        "non-ASCII name with spaces",
        "été à Zürich – 写真 1.png",
        encode(noise(32, 32, 13), "PNG"),
        True,
    )
    put("JPEG named .png", "really-a-jpeg.png", encode(noise(32, 32, 14), "JPEG"), True)

    directory = folder / "folder.png"
    directory.mkdir()
    made.append(Hostile("directory named like an image", directory, False, "directory"))
    link = folder / "dangling.png"
    link.symlink_to(folder / "gone.png")
    made.append(Hostile("broken symbolic link", link, False, "symbolic link"))
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    made.append(Hostile("named pipe", fifo, False, "not a regular file"))
    put("unreadable file", UNREADABLE, encode(noise(32, 32, 15), "PNG"), False, "permission")
    return made


# ---------------------------------------------------------------- helpers for the reliability tests
def rsx(lab: Path, *args: str):
    """``rsx --lab LAB ARGS`` in this process (so a test may patch what the OS cannot simulate)."""
    from click.testing import CliRunner

    from resynth_index.cli import cli

    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def rsx_process(lab: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """``python -m resynth_index --lab LAB ARGS`` in its own process (it can be killed, race)."""
    import subprocess
    import sys

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "resynth_index", "--lab", str(lab), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class StoreState:
    images: set[str]  # sha256 of every image row
    blobs: set[str]  # sha256 of every blob file on disk
    embeddings: int  # of the lab's embedder
    embedded_images: int  # distinct images those embeddings cover
    queries: int


def store_state(lab_dir: Path) -> StoreState:
    from sqlalchemy import func, select

    from resynth_index.lab import Lab
    from resynth_index.store.models import EmbeddingRow, ImageRow, QueryRow

    with Lab.open(lab_dir) as lab, lab.session() as session:
        mine = EmbeddingRow.embedder_fingerprint == lab.fingerprint
        return StoreState(
            images=set(session.scalars(select(ImageRow.sha256))),
            blobs=set(lab.blobs.iter_shas()),
            embeddings=session.scalar(select(func.count(EmbeddingRow.id)).where(mine)),
            embedded_images=session.scalar(
                select(func.count(func.distinct(EmbeddingRow.image_id))).where(mine)
            ),
            queries=session.scalar(select(func.count(QueryRow.id))),
        )


def index_problems(lab_dir: Path) -> list[str]:
    """What ``VectorIndex.check`` finds comparing the index file with every embedding id."""
    import numpy as np
    from sqlalchemy import select

    from resynth_index.lab import Lab
    from resynth_index.store import embeddings
    from resynth_index.store.models import EmbeddingRow
    from resynth_index.store.vectors import VectorIndex

    with Lab.open(lab_dir) as lab, lab.session() as session:
        count, top = embeddings.embedding_stats(session, lab.fingerprint)
        ids = np.array(
            list(
                session.scalars(
                    select(EmbeddingRow.id).where(
                        EmbeddingRow.embedder_fingerprint == lab.fingerprint
                    )
                )
            ),
            dtype=np.int64,
        )
        index = VectorIndex(lab.index_path, lab.fingerprint, lab.settings.embedder_dim)
        return index.check(count, top, lambda: ids).problems


def with_imported_resynthesis(lab: Path, folder: Path, caption: str, seed: int = 900) -> Path:
    """Register imported generator 'imp' and store one resynthesis of ``caption`` by it.

    Queries with ``--candidates imp --no-generate`` then need no generation at all.
    """
    added = rsx(lab, "generator", "add", "imp", "--imported")
    assert added.exit_code == 0, added.output
    [image] = good_images(folder, 1, seed=seed)
    stored = rsx(
        lab, "ingest", str(image), "--role", "resynthesis", "--generator", "imp",
        "--caption", caption,
    )  # fmt: skip
    assert stored.exit_code == 0, stored.output
    return image


def overlapping_folders(tmp_path: Path, count: int, first_end: int, second_start: int):
    """``count`` good images, and folders 'first' (images[:first_end]) and 'second'
    (images[second_start:]) that share images[second_start:first_end]."""
    images = good_images(tmp_path / "pool", count, seed=300)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    for path in images[:first_end]:
        (first / path.name).write_bytes(path.read_bytes())
    for path in images[second_start:]:
        (second / path.name).write_bytes(path.read_bytes())
    return images, first, second


def assert_each_stored_once(lab: Path, files: list[Path], queries: int) -> None:
    """Every file is stored, embedded and indexed once, the lab holds ``queries`` queries and
    `rsx check` finds nothing wrong. A query leaves its own embedding to the next sync, so the
    index is synced first, as `rsx index sync` does after a burst of queries."""
    state = store_state(lab)
    expected = {file_sha(p) for p in files}
    assert state.images == expected and state.blobs == expected
    assert state.embeddings == state.embedded_images == len(expected)
    assert state.queries == queries
    synced = rsx(lab, "index", "sync")
    assert synced.exit_code == 0, synced.output
    assert index_problems(lab) == []
    check = rsx(lab, "check")
    assert check.exit_code == 0, check.output


def interrupt_the_second_batch(monkeypatch) -> None:
    """Make ingest's second batch raise KeyboardInterrupt (Ctrl-C) as it is stored."""
    from resynth_index.pipeline import ingest as ingest_module

    real_batch = ingest_module._ingest_batch
    calls: list[int] = []

    def interrupted_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "_ingest_batch", interrupted_on_the_second_batch)
