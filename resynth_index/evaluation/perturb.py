"""Post-processing operators for robustness tests, applied to query images only.

Ranges follow the paper's protocol (see RESEARCH.md): JPEG and WebP quality 50-99, resize x0.4-2.0,
crop keeping 50-90 % of each side, rotation up to +-5 degrees, contrast and brightness x1.2-2.4,
median filter 3/5/7, white noise sigma 16-64 (on 0-255), grey conversion, "social" (fit in 1080 px
then JPEG 85) and "twitter" (fit in 4096 px then JPEG 85). The paper gives no range for blur: a
Gaussian blur of radius 0.5-2 px is used.

Parameters are drawn per image from a numpy ``Generator``; ``image_rng(seed, op, key)`` gives the
generator for one image, so a run is reproducible and independent of the order images come in.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from resynth_index.errors import RsxError

if TYPE_CHECKING:
    from PIL import Image

Params = dict[str, Any]


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _encode(image: Image.Image, fmt: str, quality: int) -> Image.Image:
    from PIL import Image

    buffer = io.BytesIO()
    _rgb(image).save(buffer, format=fmt, quality=int(quality))
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return _rgb(decoded)


def _fit(image: Image.Image, limit: int) -> Image.Image:
    from PIL import Image

    scale = limit / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    size = (min(size[0], limit), min(size[1], limit))
    return image.resize(size, Image.Resampling.LANCZOS)


def jpeg(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    quality = int(rng.integers(50, 100))
    return _encode(image, "JPEG", quality), {"quality": quality}


def webp(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    quality = int(rng.integers(50, 100))
    return _encode(image, "WEBP", quality), {"quality": quality}


def resize(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    from PIL import Image

    factor = float(rng.uniform(0.4, 2.0))
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return _rgb(image).resize(size, Image.Resampling.BICUBIC), {"factor": factor}


def crop(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    keep = float(rng.uniform(0.5, 0.9))
    width, height = max(1, round(image.width * keep)), max(1, round(image.height * keep))
    left = int(rng.integers(0, image.width - width + 1))
    top = int(rng.integers(0, image.height - height + 1))
    box = (left, top, left + width, top + height)
    return _rgb(image).crop(box), {"keep": keep, "box": box}


def rotate(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    from PIL import Image

    angle = float(rng.uniform(-5.0, 5.0))
    return _rgb(image).rotate(angle, resample=Image.Resampling.BICUBIC), {"angle": angle}


def blur(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    from PIL import ImageFilter

    radius = float(rng.uniform(0.5, 2.0))
    return _rgb(image).filter(ImageFilter.GaussianBlur(radius)), {"radius": radius}


def median(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    from PIL import ImageFilter

    size = int(rng.choice([3, 5, 7]))
    return _rgb(image).filter(ImageFilter.MedianFilter(size)), {"size": size}


def noise(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    from PIL import Image

    sigma = float(rng.uniform(16.0, 64.0))
    pixels = np.asarray(_rgb(image), dtype=np.float64)
    noisy = np.clip(np.rint(pixels + rng.normal(0.0, sigma, pixels.shape)), 0, 255)
    return Image.fromarray(noisy.astype(np.uint8), "RGB"), {"sigma": sigma}


def contrast(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    from PIL import ImageEnhance

    factor = float(rng.uniform(1.2, 2.4))
    return ImageEnhance.Contrast(_rgb(image)).enhance(factor), {"factor": factor}


def brightness(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    from PIL import ImageEnhance

    factor = float(rng.uniform(1.2, 2.4))
    return ImageEnhance.Brightness(_rgb(image)).enhance(factor), {"factor": factor}


def grey(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    return _rgb(image).convert("L").convert("RGB"), {}


def social(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    return _encode(_fit(_rgb(image), 1080), "JPEG", 85), {"fit": 1080, "quality": 85}


def twitter(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    return _encode(_fit(_rgb(image), 4096), "JPEG", 85), {"fit": 4096, "quality": 85}


OPERATORS: dict[str, Callable[[Image.Image, np.random.Generator], tuple[Image.Image, Params]]] = {
    "jpeg": jpeg,
    "webp": webp,
    "resize": resize,
    "crop": crop,
    "rotate": rotate,
    "blur": blur,
    "median": median,
    "noise": noise,
    "contrast": contrast,
    "brightness": brightness,
    "grey": grey,
    "social": social,
    "twitter": twitter,
}


def parse_operators(text: str | None) -> list[str]:
    """'jpeg,blur' -> ['jpeg', 'blur']; 'all' -> every operator; '' or None -> []."""
    if not text:
        return []
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return list(OPERATORS)
    unknown = [n for n in names if n not in OPERATORS]
    if unknown:
        raise RsxError(
            f"unknown post-processing operator(s) {', '.join(unknown)}: use 'all' or any of "
            f"{', '.join(OPERATORS)}"
        )
    return list(dict.fromkeys(names))


def image_rng(seed: int, op: str, key: int) -> np.random.Generator:
    """The generator that draws ``op``'s parameters for image ``key`` in a run seeded ``seed``."""
    return np.random.default_rng([int(seed), list(OPERATORS).index(op), int(key)])


def apply(op: str, image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Params]:
    """Post-process ``image`` with ``op``, its parameters drawn from ``rng``; (image, params)."""
    try:
        operator = OPERATORS[op]
    except KeyError:
        raise RsxError(f"unknown post-processing operator {op!r}") from None
    return operator(image, rng)
