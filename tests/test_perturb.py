"""Each post-processing operator changes the image as specified, with per-image parameters."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from resynth_index.errors import RsxError
from resynth_index.evaluation import perturb


def _image(width=64, height=48, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 4 % 256, y * 5 % 256, (x + y) * 3 % 256], axis=-1).astype(float)
    pixels = np.clip(base * 0.6 + rng.normal(60, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _run(op, image=None, seed=0):
    return perturb.apply(op, image or _image(), np.random.default_rng(seed))


def _differs(a: Image.Image, b: Image.Image) -> bool:
    return a.size != b.size or bool(np.any(np.asarray(a) != np.asarray(b.convert(a.mode))))


@pytest.mark.parametrize("op", ["jpeg", "webp"])
def test_lossy_codecs_decode_and_change_pixels(op):
    original = _image()
    changed, params = _run(op, original)
    assert 50 <= params["quality"] <= 99
    assert changed.mode == "RGB" and changed.size == original.size
    assert _differs(original, changed)


def test_resize_scales_by_the_drawn_factor():
    changed, params = _run("resize")
    assert 0.4 <= params["factor"] <= 2.0
    assert changed.size == (round(64 * params["factor"]), round(48 * params["factor"]))


def test_crop_keeps_a_fraction_in_range():
    changed, params = _run("crop")
    assert 0.5 <= params["keep"] <= 0.9
    assert changed.size == (round(64 * params["keep"]), round(48 * params["keep"]))
    left, top, right, bottom = params["box"]
    assert 0 <= left and right <= 64 and 0 <= top and bottom <= 48


@pytest.mark.parametrize("op", ["rotate", "blur", "median", "noise"])
def test_filters_keep_the_size_and_change_pixels(op):
    original = _image()
    changed, params = _run(op, original)
    assert changed.size == original.size and _differs(original, changed)
    if op == "rotate":
        assert -5 <= params["angle"] <= 5
    if op == "median":
        assert params["size"] in (3, 5, 7)
    if op == "noise":
        assert 16 <= params["sigma"] <= 64


@pytest.mark.parametrize("op", ["contrast", "brightness"])
def test_enhancements_scale_in_range(op):
    original = _image()
    changed, params = _run(op, original)
    assert 1.2 <= params["factor"] <= 2.4
    if op == "brightness":  # brighter on average
        assert np.asarray(changed).mean() > np.asarray(original).mean()
    else:  # wider spread
        assert np.asarray(changed).std() > np.asarray(original).std()


def test_grey_makes_the_channels_equal():
    changed, _ = _run("grey")
    pixels = np.asarray(changed)
    assert changed.mode == "RGB"
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_social_fits_in_1080_and_recompresses():
    original = _image(1500, 1200)
    changed, params = _run("social", original)
    assert max(changed.size) == 1080 and changed.size == (1080, 864)
    assert params == {"fit": 1080, "quality": 85}
    small, _ = _run("social", _image())
    assert small.size == (64, 48) and _differs(_image(), small)  # JPEG 85 even when it fits


def test_twitter_fits_in_4096():
    changed, _ = _run("twitter", _image(4200, 8))
    assert changed.size[0] == 4096 and max(changed.size) <= 4096


def test_parameters_are_drawn_per_image_and_reproducible():
    rng = np.random.default_rng(5)
    first = perturb.apply("jpeg", _image(), rng)[1]
    second = perturb.apply("jpeg", _image(seed=1), rng)[1]
    resize_a = perturb.apply("resize", _image(), rng)[1]
    resize_b = perturb.apply("resize", _image(), rng)[1]
    assert resize_a != resize_b  # two images, two draws
    assert first != second
    again = np.random.default_rng(5)
    assert perturb.apply("jpeg", _image(), again)[1] == first
    one = perturb.image_rng(0, "crop", 11)
    two = perturb.image_rng(0, "crop", 12)
    assert perturb.apply("crop", _image(), one)[1] != perturb.apply("crop", _image(), two)[1]
    same = perturb.apply("crop", _image(), perturb.image_rng(0, "crop", 11))[1]
    assert same == perturb.apply("crop", _image(), perturb.image_rng(0, "crop", 11))[1]


def test_every_operator_is_covered_and_parsing():
    assert perturb.parse_operators("all") == list(perturb.OPERATORS)
    assert perturb.parse_operators("jpeg, blur,jpeg") == ["jpeg", "blur"]
    assert perturb.parse_operators(None) == []
    with pytest.raises(RsxError, match="sharpen"):
        perturb.parse_operators("jpeg,sharpen")
