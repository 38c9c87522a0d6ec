"""Safe loading of untrusted image files.

Every image handed to rsx is treated as hostile: it may be empty, truncated, not an image at all,
a decompression bomb (a tiny file declaring billions of pixels), a special file that never ends, or
a format whose decoder shells out to other programs. This module reads the bytes once, hashes them,
decodes them from memory with a short list of plain raster formats, checks the declared size before
any pixel is decoded, forces a full decode so truncation is caught now rather than later, and turns
every failure into one ``ImageError`` line that names the file and the reason.

The decoded picture is normalised (EXIF orientation applied, first frame, 8-bit RGB with any alpha
composited on white) so that every later stage (captioning, embedding) sees the same kind of input.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from resynth_index.errors import ImageError
from resynth_index.hashing import hash_bytes

if TYPE_CHECKING:
    from PIL import Image as PILImage

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

# Decoders Pillow may use. Anything else (EPS runs Ghostscript, and dozens of rarely used
# plugins) is refused as "not a supported image". MPO (multi-picture JPEG) comes via "JPEG".
_SAFE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "DIB", "TIFF")

_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class LoadedImage:
    """An image file that decoded completely, with its exact bytes and a normalised RGB copy."""

    sha256: str  # of the file's exact bytes
    data: bytes  # the file's exact bytes (what goes to the blob store)
    format: str  # PIL format name, e.g. "PNG", "JPEG"
    width: int  # after EXIF orientation
    height: int
    image: PILImage.Image  # normalised 8-bit RGB, orientation applied, first frame


def load_image_file(
    path: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> LoadedImage:
    """Read, hash, validate and decode one image file; any failure raises ``ImageError``."""
    data = _read_file(Path(path), max_bytes)
    return load_image_bytes(data, str(path), max_pixels=max_pixels, max_bytes=max_bytes)


def load_image_bytes(
    data: bytes,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> LoadedImage:
    """Decode an image from its bytes; ``name`` is only used in error messages."""
    if not data:
        raise ImageError(f"{name}: the file is empty")
    if len(data) > max_bytes:
        raise ImageError(f"{name}: the file is {len(data):,} bytes, over the {max_bytes:,} limit")
    image, fmt = _decode(data, name, max_pixels)
    try:
        normalised = normalise(image)
    except ImageError as exc:
        raise ImageError(f"{name}: {exc}") from None
    except Exception as exc:  # hostile EXIF or odd modes must not escape raw
        raise ImageError(f"{name}: the image could not be normalised ({_reason(exc)})") from None
    finally:
        image.close()
    return LoadedImage(
        sha256=hash_bytes(data),
        data=data,
        format=fmt,
        width=normalised.width,
        height=normalised.height,
        image=normalised,
    )


def normalise(image: PILImage.Image) -> PILImage.Image:
    """Return a new 8-bit RGB image: EXIF orientation applied, current frame, alpha on white.

    16-bit and 32-bit greyscale are scaled down (Pillow's own conversion clips them), palette and
    greyscale images with a transparent colour are composited like images with an alpha channel.
    Raises ``ImageError`` (without a file name) for a colour mode that cannot become RGB.
    """
    from PIL import ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oriented = ImageOps.exif_transpose(image)
    if oriented is None:  # only when transposing in place, kept for safety
        oriented = image
    return _to_rgb(oriented)


def _read_file(path: Path, max_bytes: int) -> bytes:
    """Read a regular file's bytes once, with a precise reason for every way that can fail."""
    name = str(path)
    try:
        link_info = os.lstat(path)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot be examined ({_reason(exc)})") from None
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if stat.S_ISLNK(link_info.st_mode):
            raise ImageError(f"{name}: broken symbolic link") from None
        raise ImageError(f"{name}: no such file") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot be examined ({_reason(exc)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{name}: is not a regular file")
    if info.st_size > max_bytes:
        raise ImageError(
            f"{name}: the file is {info.st_size:,} bytes, over the {max_bytes:,} limit"
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)  # +1: notice a file that grew after stat
    except PermissionError:
        raise ImageError(f"{name}: unreadable (permission denied)") from None
    except OSError as exc:
        raise ImageError(f"{name}: unreadable ({_reason(exc)})") from None
    if len(data) > max_bytes:
        raise ImageError(f"{name}: the file is over the {max_bytes:,} byte limit")
    return data


def _decode(data: bytes, name: str, max_pixels: int) -> tuple[PILImage.Image, str]:
    """Open from memory, check the declared size, then decode the first frame fully."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        # We check the pixel count ourselves (against max_pixels) before decoding; Pillow's own
        # warning threshold is global and may be lower or higher than ours.
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data), formats=_SAFE_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image in a supported format") from None
        except Image.DecompressionBombError:
            raise ImageError(_too_many_pixels(name)) from None
        except Exception as exc:
            raise ImageError(f"{name}: not a valid image ({_reason(exc)})") from None
        fmt = str(image.format or "unknown")
        width, height = image.size
        if width <= 0 or height <= 0:
            image.close()
            raise ImageError(f"{name}: declares an empty size {width}x{height}")
        if width * height > max_pixels:
            image.close()
            raise ImageError(
                f"{name}: declares {width}x{height} = {width * height:,} pixels, over the "
                f"{max_pixels:,} limit (possible decompression bomb); {RAISE_LIMIT}"
            )
        try:
            image.load()  # full decode of the first frame; LOAD_TRUNCATED_IMAGES stays off
        except Image.DecompressionBombError:
            image.close()
            raise ImageError(_too_many_pixels(name)) from None
        except Exception as exc:
            image.close()
            raise ImageError(f"{name}: {_decode_failure(exc)}") from None
    return image, fmt


#: What a refusal for too many pixels adds: a large image that is genuine can still be read.
RAISE_LIMIT = "if the image is genuine, raise the limit: rsx config set max_pixels N"


def _too_many_pixels(name: str) -> str:
    """The refusal of an image Pillow itself found too large to decode (past its own limit)."""
    return f"{name}: declares too many pixels (decompression bomb); {RAISE_LIMIT}"


def _decode_failure(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in text or "broken data stream" in text:
        return f"truncated or corrupt image data ({_reason(exc)})"
    return f"the image data could not be decoded ({_reason(exc)})"


def _reason(exc: BaseException) -> str:
    """One line describing an exception, whatever it carries."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text[:200] if text else type(exc).__name__


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    from PIL import Image

    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_grey_to_rgb(image)
    if mode == "1":
        return image.convert("L").convert("RGB")
    if mode == "La":  # premultiplied: Pillow converts it to nothing but LA
        image, mode = image.convert("LA"), "LA"
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageError(f"colour mode {mode} cannot be converted to RGB") from None


def _wide_grey_to_rgb(image: PILImage.Image):
    """Scale 16-bit, 32-bit integer and float greyscale to 8 bits instead of clipping."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    mode = image.mode
    if mode.startswith("I;16"):
        scale = 65535.0
    elif mode == "F":
        scale = 1.0 if values.size and values.max() <= 1.0 else 255.0
    else:  # "I": 32-bit ints; most often 16-bit data widened, sometimes plain 8-bit
        peak = values.max() if values.size else 0.0
        scale = 255.0 if peak <= 255 else 65535.0
    grey = np.clip(np.rint(values * (255.0 / scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
