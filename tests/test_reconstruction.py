"""The reconstruction signal: a candidate's own autoencoder redraws its own images best."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from resynth_index.attribution.evidence.reconstruction import (
    UNSUPPORTED_IMPORTED,
    ReconstructionScorer,
    autoencoder_folder,
    crop_box,
    pixel_distance,
    reconstruction_fingerprint,
)
from resynth_index.errors import RsxError
from resynth_index.models.generators.imported import ImportedGenerator

CAPTIONS = ["a portrait of a sailor", "a red bicycle"]


def _named(images):
    return [(hashlib.sha256(image.tobytes()).hexdigest(), image) for image in images]


@pytest.fixture
def toy_models(toy_lab):
    """The toy lab's three generators (built from seeds 11, 22, 33), and its embedder."""
    from resynth_index.lab import Lab

    with Lab.open(toy_lab) as lab:
        models = {row.name: lab.generator_model(row) for row in lab.generators()}
        yield models, lab.embedder


def _images(model, seeds=(1000, 1001)):
    from resynth_index.models.generators.protocol import GenerationRequest

    return model.generate([GenerationRequest(c, s) for c, s in zip(CAPTIONS, seeds, strict=True)])


@pytest.mark.slow
def test_own_autoencoder_reconstructs_its_own_images_best(toy_models):
    """Verified on the toy zoo with the default (embedder) metric: for every image of each toy
    generator, its own autoencoder changes it less than either unrelated toy's autoencoder."""
    models, embedder = toy_models
    scorer = ReconstructionScorer(
        metric="embedder", embed=embedder.embed, embedder_fingerprint=embedder.fingerprint
    )
    names = sorted(models)
    order = [models[n] for n in names]
    for column, name in enumerate(names):
        distances = scorer.distances(order, _named(_images(models[name])))
        own = distances[:, column]
        others = np.delete(distances, column, axis=1)
        assert np.all(own[:, None] < others), (name, distances)
    again = ReconstructionScorer(
        metric="embedder", embed=embedder.embed, embedder_fingerprint=embedder.fingerprint
    ).distances(order, _named(_images(models[names[0]])))
    first = scorer.distances(order, _named(_images(models[names[0]])))
    np.testing.assert_array_equal(again, first)  # deterministic


@pytest.mark.slow
def test_pixel_metric_measures_the_reconstruction_and_caches_it(toy_models):
    """Pixel metrics: on random toy autoencoders their baseline differs per autoencoder, so
    own-is-lowest does not hold for every toy pair (see the report); the mechanics are tested."""
    models, _embedder = toy_models
    model = models["toy-a"]
    scorer = ReconstructionScorer(metric="pixel-l1")
    images = _named(_images(model))
    first = scorer.distances([model], images)
    assert first.shape == (2, 1) and np.all((first > 0) & (first < 1))
    assert scorer.computed == 2
    again = scorer.distances([model], images + images[:1])  # cached, duplicates included
    assert scorer.computed == 2
    np.testing.assert_array_equal(again[:2], first)
    # the same value from the arrays themselves: encode, decode, mean absolute difference
    reconstructor = scorer.reconstructor(model)
    pixels = np.asarray(images[0][1].convert("RGB"), dtype=np.float32)[None] / 255.0
    rebuilt = reconstructor.reconstruct(pixels)
    assert rebuilt.shape == pixels.shape and rebuilt.min() >= 0 and rebuilt.max() <= 1
    assert pixel_distance(pixels[0], rebuilt[0], "pixel-l1") == pytest.approx(first[0, 0])


def test_imported_generators_are_unsupported_never_guessed():
    imported = ImportedGenerator("midjourney")
    assert autoencoder_folder(imported) == (None, UNSUPPORTED_IMPORTED)
    scorer = ReconstructionScorer(metric="pixel-l1")
    from PIL import Image

    picture = Image.new("RGB", (16, 16), (10, 20, 30))
    out = scorer.distances([imported], [("sha", picture)])
    assert np.isnan(out).all() and scorer.computed == 0
    assert scorer.unsupported == {"midjourney": UNSUPPORTED_IMPORTED}


def test_single_file_checkpoints_and_folders_without_an_autoencoder_are_unsupported(tmp_path):
    class Runnable:
        can_generate = True
        name = "x"

        def __init__(self, path: Path) -> None:
            self.path = path

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"0")
    folder, reason = autoencoder_folder(Runnable(checkpoint))
    assert folder is None and "single-file" in reason
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderTiny"]}')
    folder, reason = autoencoder_folder(Runnable(pipeline))
    assert folder is None and "AutoencoderKL" in reason


def test_pixel_distances_and_crop_boxes():
    a = np.zeros((4, 4, 3), dtype=np.float32)
    b = np.full((4, 4, 3), 0.5, dtype=np.float32)
    assert pixel_distance(a, a, "pixel-l1") == 0.0
    assert pixel_distance(a, b, "pixel-l1") == pytest.approx(0.5)
    assert pixel_distance(a, b, "pixel-l2") == pytest.approx(0.5)
    assert crop_box(64, 64, 2, 1024) == (0, 0, 64, 64)
    assert crop_box(67, 30, 8, 1024) == (1, 3, 65, 27)  # multiples of 8, centred
    assert crop_box(3000, 100, 8, 1024) == (988, 2, 2012, 98)  # at most 1024 a side
    left, top, right, bottom = crop_box(5, 5, 8, 1024)
    assert right <= left and bottom <= top  # smaller than the factor: nothing to encode


def test_the_fingerprint_covers_generator_metric_and_crop():
    base = reconstruction_fingerprint("g1", "pixel-l1", 1024)
    assert base == reconstruction_fingerprint("g1", "pixel-l1", 1024)
    assert base != reconstruction_fingerprint("g2", "pixel-l1", 1024)
    assert base != reconstruction_fingerprint("g1", "pixel-l2", 1024)
    assert base != reconstruction_fingerprint("g1", "pixel-l1", 512)
    assert reconstruction_fingerprint("g1", "embedder", 1024, "e1") != (
        reconstruction_fingerprint("g1", "embedder", 1024, "e2")
    )


def test_bad_metric_or_missing_embedder_is_refused():
    with pytest.raises(RsxError, match="unknown reconstruction metric"):
        ReconstructionScorer(metric="lpips")
    with pytest.raises(RsxError, match="needs the lab's embedder"):
        ReconstructionScorer(metric="embedder")


def test_component_perturbation_changes_only_the_named_components():
    """The toy zoo's per-component perturbation (fine-tune look-alikes): a mapping of equal
    scales equals the single float, and an unnamed component keeps its base weights."""
    pytest.importorskip("diffusers")
    import torch

    from resynth_index.models.toyzoo.pipelines import build_toy_pipeline

    base = build_toy_pipeline(5)
    only_unet = build_toy_pipeline(501, base_seed=5, perturbation={"unet": 0.05})
    every = build_toy_pipeline(501, base_seed=5, perturbation=0.05)
    mapping = build_toy_pipeline(
        501, base_seed=5, perturbation={"unet": 0.05, "vae": 0.05, "text_encoder": 0.05}
    )

    def same(a, b) -> bool:
        return all(
            torch.equal(x, y)
            for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        )

    assert same(only_unet.vae, base.vae) and same(only_unet.text_encoder, base.text_encoder)
    assert not same(only_unet.unet, base.unet)
    for part in ("unet", "vae", "text_encoder"):
        assert same(getattr(every, part), getattr(mapping, part))
        assert not same(getattr(every, part), getattr(base, part))
    with pytest.raises(ValueError, match="unknown toy component"):
        build_toy_pipeline(501, base_seed=5, perturbation={"decoder": 0.1})
