"""Safe image loading: odd colour modes normalise to RGB, every hostile input is an ImageError."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resynth_index.errors import ImageError
from resynth_index.media.images import (
    IMAGE_SUFFIXES,
    LoadedImage,
    load_image_bytes,
    load_image_file,
    normalise,
)
from resynth_index.models.fingerprints import hash_bytes


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _check_rgb(loaded: LoadedImage, width: int, height: int) -> None:
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (width, height)
    assert (loaded.width, loaded.height) == (width, height)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _png_declaring(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header declares width x height 8-bit grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(
        b"\x00" * 1024
    )  # far too little data: never reached if the size is checked
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- good inputs


def test_rgb_png_round_trip_keeps_bytes_hash_and_pixels(tmp_path: Path) -> None:
    source = _noise(17, 9)
    data = _encode(source, "PNG")
    loaded = load_image_file(_write(tmp_path, "plain.png", data))
    assert loaded.data == data
    assert loaded.sha256 == hash_bytes(data)
    assert loaded.format == "PNG"
    _check_rgb(loaded, 17, 9)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(source))


def test_cmyk_jpeg_loads_as_rgb(tmp_path: Path) -> None:
    data = _encode(Image.new("CMYK", (20, 12), (0, 255, 255, 0)), "JPEG", quality=95)
    loaded = load_image_file(_write(tmp_path, "cmyk.jpg", data))
    assert loaded.format == "JPEG"
    _check_rgb(loaded, 20, 12)
    red, green, blue = np.asarray(loaded.image).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60  # CMY(0,1,1) is red, not its inverse


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    source = Image.fromarray(ramp)
    data = _encode(source, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    loaded = load_image_bytes(data, "deep.png")
    _check_rgb(loaded, 64, 8)
    grey = np.asarray(loaded.image)[:, :, 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255
    assert len(np.unique(grey)) > 200  # a real ramp, not a clipped step at 255
    assert np.all(np.diff(grey[0]) >= 0)


def test_palette_with_transparency_composites_on_white(tmp_path: Path) -> None:
    palette_image = Image.new("P", (10, 6), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    palette_image.paste(1, (5, 0, 10, 6))
    data = _encode(palette_image, "PNG", transparency=0)
    loaded = load_image_file(_write(tmp_path, "palette.png", data))
    _check_rgb(loaded, 10, 6)
    pixels = np.asarray(loaded.image)
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # transparent black became white
    assert tuple(pixels[0, 9]) == (255, 0, 0)


def test_la_image_composites_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (7, 5), (0, 0))
    la.paste((0, 255), (0, 0, 3, 5))
    loaded = load_image_file(_write(tmp_path, "la.png", _encode(la, "PNG")))
    _check_rgb(loaded, 7, 5)
    pixels = np.asarray(loaded.image)
    assert tuple(pixels[0, 0]) == (0, 0, 0)
    assert tuple(pixels[0, 6]) == (255, 255, 255)


def test_rgba_half_transparent_blends_with_white() -> None:
    image = normalise(Image.new("RGBA", (3, 3), (0, 0, 0, 128)))
    assert image.mode == "RGB"
    value = np.asarray(image)[1, 1, 0]
    assert 120 <= value <= 135


@pytest.mark.parametrize("fmt,suffix", [("GIF", ".gif"), ("WEBP", ".webp")])
def test_animation_gives_first_frame(tmp_path: Path, fmt: str, suffix: str) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    loaded = load_image_file(_write(tmp_path, f"anim{suffix}", data))
    _check_rgb(loaded, 16, 16)
    red, _, blue = np.asarray(loaded.image)[8, 8]
    assert red > 200 and blue < 50


def test_one_pixel_image_is_fine(tmp_path: Path) -> None:
    loaded = load_image_file(_write(tmp_path, "dot.png", _encode(Image.new("L", (1, 1), 7), "PNG")))
    _check_rgb(loaded, 1, 1)
    assert tuple(np.asarray(loaded.image)[0, 0]) == (7, 7, 7)


def test_exif_orientation_6_swaps_width_and_height(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(_noise(40, 20), "JPEG", exif=exif)
    loaded = load_image_file(_write(tmp_path, "rotated.jpg", data))
    _check_rgb(loaded, 20, 40)


@pytest.mark.parametrize("mode", ["1", "L", "I", "F", "YCbCr", "RGBa", "La", "PA", "I;16B"])
def test_normalise_handles_every_common_mode(mode: str) -> None:
    base = Image.new("RGBA", (5, 4), (10, 20, 30, 200))
    via = {"RGBa": "RGBA", "La": "LA", "PA": "RGBA"}.get(mode, "L")
    image = base.convert(via).convert(mode)
    assert image.mode == mode
    result = normalise(image)
    assert result.mode == "RGB"
    assert result.size == (5, 4)


def test_normalise_does_not_change_its_input() -> None:
    source = Image.new("RGBA", (3, 3), (1, 2, 3, 0))
    normalise(source)
    assert source.mode == "RGBA"


def test_jpeg_with_png_suffix_is_decoded_by_content(tmp_path: Path) -> None:
    loaded = load_image_file(_write(tmp_path, "lies.png", _encode(_noise(8, 8), "JPEG")))
    assert loaded.format == "JPEG"


def test_non_ascii_name_with_spaces(tmp_path: Path) -> None:
    path = _write(tmp_path, "été à Zürich 夏.png", _encode(_noise(4, 3), "PNG"))
    assert load_image_file(str(path)).image.size == (4, 3)


def test_suffixes_are_lowercase_with_dot() -> None:
    assert all(suffix.startswith(".") and suffix == suffix.lower() for suffix in IMAGE_SUFFIXES)
    assert {".png", ".jpg", ".webp"} <= IMAGE_SUFFIXES


# --------------------------------------------------------------------------- hostile inputs


def _assert_image_error(path: Path, *fragments: str, **kwargs) -> None:
    with pytest.raises(ImageError) as caught:
        load_image_file(path, **kwargs)
    message = str(caught.value)
    assert path.name in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message.lower()


def test_empty_file(tmp_path: Path) -> None:
    _assert_image_error(_write(tmp_path, "empty file.png", b""), "empty")


def test_truncated_png(tmp_path: Path) -> None:
    data = _encode(_noise(64, 64), "PNG")
    _assert_image_error(_write(tmp_path, "cut.png", data[: len(data) // 2]), "truncated")


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _encode(_noise(64, 64), "JPEG", quality=90)
    _assert_image_error(_write(tmp_path, "cut.jpg", data[: len(data) // 2]), "truncated")


def test_random_bytes_with_png_suffix(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _assert_image_error(_write(tmp_path, "noise.png", data), "not an image")


def test_text_file(tmp_path: Path) -> None:
    _assert_image_error(_write(tmp_path, "notes.jpg", b"just some text\n" * 20), "not an image")


def test_unsupported_format_is_refused(tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (4, 4)), "PPM")  # a real image, but not on the safe list
    _assert_image_error(_write(tmp_path, "plain.ppm", data), "not an image")


def test_decompression_bomb_png_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _write(tmp_path, "bomb.png", _png_declaring(100_000, 100_000))
    _assert_image_error(path, "bomb")


def test_bomb_just_over_our_limit_but_under_pillows(tmp_path: Path) -> None:
    path = _write(tmp_path, "big.png", _png_declaring(9_000, 9_000))  # 81 M > 64 M default
    _assert_image_error(path, "pixels")


def test_over_max_pixels(tmp_path: Path) -> None:
    path = _write(tmp_path, "twenty.png", _encode(_noise(20, 20), "PNG"))
    _assert_image_error(path, "400", max_pixels=399)
    assert load_image_file(path, max_pixels=400).width == 20


def test_larger_than_byte_limit(tmp_path: Path) -> None:
    path = _write(tmp_path, "heavy.png", _encode(_noise(32, 32), "PNG"))
    _assert_image_error(path, "limit", max_bytes=100)
    with pytest.raises(ImageError, match="limit"):
        load_image_bytes(path.read_bytes(), "heavy.png", max_bytes=100)


def test_missing_file(tmp_path: Path) -> None:
    _assert_image_error(tmp_path / "nowhere.png", "no such file")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    _assert_image_error(folder, "directory")


def test_broken_symlink(tmp_path: Path) -> None:
    link = tmp_path / "dangling.png"
    link.symlink_to(tmp_path / "gone.png")
    _assert_image_error(link, "symbolic link")


def test_fifo_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    _assert_image_error(fifo, "regular file")


def test_unreadable_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "secret.png", _encode(_noise(4, 4), "PNG"))
    path.chmod(0)
    try:
        try:
            path.read_bytes()
        except PermissionError:
            _assert_image_error(path, "permission")
        else:
            pytest.skip("running as root: a chmod 000 file is still readable")
    finally:
        path.chmod(0o644)


def test_permission_denied_is_reported_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root reads chmod-000 files, so the denial itself is simulated at the open() call."""
    import resynth_index.media.images as images_module

    path = _write(tmp_path, "locked.png", _encode(_noise(4, 4), "PNG"))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images_module, "open", denied, raising=False)
    _assert_image_error(path, "permission denied")


def test_bytes_errors_name_the_given_name() -> None:
    with pytest.raises(ImageError, match="upload #3"):
        load_image_bytes(b"", "upload #3")
    with pytest.raises(ImageError, match="upload #4"):
        load_image_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "upload #4")
