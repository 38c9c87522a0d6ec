"""Generators: settings, determinism, batch independence, loading, fingerprints, errors, toy zoo."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from resynth_index.errors import ModelLoadError, RsxError
from resynth_index.models.generators import (
    DiffusersGenerator,
    GenerationRequest,
    GenerationSettings,
    ImportedGenerator,
    weights_fingerprint,
)
from resynth_index.models.generators.diffusers import generate_images
from resynth_index.models.toyzoo.pipelines import (
    TOY_SETTINGS,
    build_toy_pipeline,
    save_toy_pipeline,
)

REQUESTS = [
    GenerationRequest("a red apple on a wooden table", 11),
    GenerationRequest("a dog running in the snow", 12),
    GenerationRequest("a city skyline at night", 13),
]
FAMILY_PERTURBATION = 0.1  # measured: member-base pixel MSE ~0.002, unrelated seeds ~0.05


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.int16) for image in images])


@pytest.fixture(scope="module")
def toy_pipe():
    return build_toy_pipeline(1)


@pytest.fixture(scope="module")
def toy_dir(toy_pipe, tmp_path_factory) -> Path:
    """Seed-1 toy saved by a plain diffusers ``save_pretrained`` (no rsx helper)."""
    folder = tmp_path_factory.mktemp("toy1")
    toy_pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> Path:
    """Seed-2 toy saved by the rsx helper."""
    return save_toy_pipeline(tmp_path_factory.mktemp("toy2"), 2)


@pytest.fixture(scope="module")
def toy_gen(toy_dir) -> DiffusersGenerator:
    return DiffusersGenerator("toy1", toy_dir, TOY_SETTINGS)


# ------------------------------------------------------------------ settings
def test_settings_round_trip_and_unknown_keys():
    settings = GenerationSettings(steps=3, scheduler="DDIMScheduler", negative_prompt="blurry")
    assert GenerationSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(RsxError, match="stepz"):
        GenerationSettings.from_dict({**settings.to_dict(), "stepz": 4})
    with pytest.raises(RsxError):
        GenerationSettings(dtype="float8")
    assert (
        GenerationSettings(guidance=7).output_hash()
        == GenerationSettings(guidance=7.0).output_hash()
    )


# ------------------------------------------------------------------ generation
@pytest.mark.slow
def test_determinism_and_seed_dependence(toy_gen):
    first = pixels(toy_gen.generate(REQUESTS[:2]))
    again = pixels(toy_gen.generate(REQUESTS[:2]))
    assert np.array_equal(first, again)
    assert first.shape == (2, TOY_SETTINGS.height, TOY_SETTINGS.width, 3)
    reseeded = pixels(toy_gen.generate([GenerationRequest(REQUESTS[0].caption, 999)]))
    assert np.abs(reseeded[0] - first[0]).mean() > 5


@pytest.mark.slow
def test_batch_independence(toy_gen):
    """Each image has its own seeded generator, so batching does not change it.

    Not bit-identical on CPU: oneDNN convolutions and attention pick batch-size-dependent kernels,
    so activations differ in the last float bits (~1e-6) and a rare pixel rounds the other way.
    """
    calls: list[int] = []
    batched = pixels(toy_gen.generate(REQUESTS, batch_size=3, progress=calls.append))
    alone = pixels([toy_gen.generate([r], batch_size=1)[0] for r in REQUESTS])
    assert calls == [3]
    assert np.abs(batched - alone).max() <= 1
    assert np.mean(batched != alone) < 0.001
    calls.clear()
    toy_gen.generate(REQUESTS, batch_size=2, progress=calls.append)
    assert calls == [2, 1]


def test_saved_pipeline_matches_in_memory(toy_pipe, toy_gen):
    in_memory = pixels(generate_images(toy_pipe, REQUESTS[:2], TOY_SETTINGS))
    assert np.array_equal(in_memory, pixels(toy_gen.generate(REQUESTS[:2])))


@pytest.mark.slow
def test_scheduler_swap(toy_dir):
    settings = replace(TOY_SETTINGS, scheduler="EulerDiscreteScheduler")
    gen = DiffusersGenerator("euler", toy_dir, settings)
    assert type(gen.load().scheduler).__name__ == "EulerDiscreteScheduler"
    assert len(gen.generate(REQUESTS[:1])) == 1
    with pytest.raises(RsxError, match="NoSuchScheduler"):
        DiffusersGenerator("bad", toy_dir, replace(TOY_SETTINGS, scheduler="NoSuchScheduler"))


# ------------------------------------------------------------------ fingerprints
def test_fingerprint_stable_and_sensitive(toy_dir, other_dir, toy_gen):
    assert DiffusersGenerator("again", toy_dir, TOY_SETTINGS).fingerprint == toy_gen.fingerprint
    changes = [
        {"steps": 5},
        {"guidance": 4.0},
        {"width": 72},
        {"height": 72},
        {"scheduler": "EulerDiscreteScheduler"},
        {"negative_prompt": "blurry"},
        {"dtype": "bfloat16"},
    ]
    prints = {toy_gen.fingerprint}
    for change in changes:
        prints.add(DiffusersGenerator("x", toy_dir, replace(TOY_SETTINGS, **change)).fingerprint)
    assert len(prints) == len(changes) + 1
    assert DiffusersGenerator("x", other_dir, TOY_SETTINGS).fingerprint not in prints
    on_cpu = DiffusersGenerator("x", toy_dir, replace(TOY_SETTINGS, device="cpu"))
    assert on_cpu.fingerprint == toy_gen.fingerprint
    assert weights_fingerprint(toy_dir) != weights_fingerprint(other_dir)


def test_fingerprint_follows_weight_files(toy_dir, tmp_path):
    copy = shutil.copytree(toy_dir, tmp_path / "copy")
    assert weights_fingerprint(copy) == weights_fingerprint(toy_dir)  # paths are relative
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(copy) != weights_fingerprint(toy_dir)


# ------------------------------------------------------------------ errors
@pytest.mark.slow
def test_load_errors(toy_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="no such"):
        DiffusersGenerator("x", tmp_path / "missing", TOY_SETTINGS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        DiffusersGenerator("x", tmp_path / "empty", TOY_SETTINGS)
    broken = shutil.copytree(toy_dir, tmp_path / "broken")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    gen = DiffusersGenerator("x", broken, TOY_SETTINGS)  # hashing the files needs no load
    with pytest.raises(ModelLoadError) as caught:
        gen.load()
    assert "\n" not in str(caught.value) and str(broken) in str(caught.value)


def test_single_file_needs_config(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="--config DIR is required"):
        DiffusersGenerator("x", checkpoint, TOY_SETTINGS)
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=".safetensors or .ckpt"):
        DiffusersGenerator("x", pickle, TOY_SETTINGS)


def test_imported_generator_cannot_generate():
    gen = ImportedGenerator("midjourney")
    assert not gen.can_generate and DiffusersGenerator.can_generate
    assert gen.settings.output_hash() == "imported"
    assert gen.fingerprint == ImportedGenerator("midjourney").fingerprint
    assert gen.fingerprint != ImportedGenerator("dalle").fingerprint
    with pytest.raises(RsxError, match="midjourney is an imported generator"):
        gen.generate(REQUESTS[:1])


# ------------------------------------------------------------------ toy zoo
def test_clip_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    from resynth_index.models.toyzoo.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    reference = SimpleTokenizer()
    for text in ["A photo of a cat, 4K!", "naïve café — über_weird   spacing 日本 😀", "x's 12345"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == reference.encode(text)
    assert tokenizer("a cat")["input_ids"] == [49406, 320, 2368, 49407]


@pytest.mark.slow
def test_toy_seeds_have_distinct_weights_and_colours(toy_pipe, other_dir):
    from resynth_index.models.fingerprints import hash_state_dict

    other = DiffusersGenerator("toy2", other_dir, TOY_SETTINGS)
    assert hash_state_dict(toy_pipe.unet.state_dict()) != hash_state_dict(
        other.load().unet.state_dict()
    )
    mine = pixels(generate_images(toy_pipe, REQUESTS, TOY_SETTINGS)).mean(axis=(0, 1, 2))
    theirs = pixels(other.generate(REQUESTS)).mean(axis=(0, 1, 2))
    assert np.abs(mine - theirs).max() > 5  # systematic colour cast per toy model


@pytest.mark.slow
def test_family_members_resemble_their_base(toy_pipe, other_dir):
    def mse(a, b) -> float:
        return float(np.mean((a.astype(float) - b) ** 2))

    base = pixels(generate_images(toy_pipe, REQUESTS, TOY_SETTINGS))
    members = [
        pixels(
            generate_images(build_toy_pipeline(s, 1, FAMILY_PERTURBATION), REQUESTS, TOY_SETTINGS)
        )
        for s in (21, 22)
    ]
    unrelated = pixels(DiffusersGenerator("toy2", other_dir, TOY_SETTINGS).generate(REQUESTS))
    assert not np.array_equal(members[0], base)
    far = min(mse(base, unrelated), mse(members[0], unrelated), mse(members[1], unrelated))
    assert max(mse(members[0], base), mse(members[1], base), mse(*members)) < far / 4
