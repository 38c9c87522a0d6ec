"""open_clip embedders: loading routes, vectors, intermediate layers, fingerprints, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from toy_archs import register_toy_archs

from resynth_index.errors import ModelLoadError, RsxError
from resynth_index.models.embedders import (
    EmbedderSpec,
    OpenClipEmbedder,
    embedder_fingerprint,
    load_embedder,
)
from resynth_index.models.toyzoo.clip import (
    TOY_CLIP_CONFIG,
    TOY_EMBEDDER_LAYER_COUNT,
    build_toy_clip,
    save_toy_clip,
)

TOY_ARCH = "rsx-test-toy-clip"
TOY_RESNET_ARCH = "rsx-test-toy-resnet"
WEIGHTS = "open_clip_model.safetensors"


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return save_toy_clip(tmp_path_factory.mktemp("toy0"), seed=0)


@pytest.fixture(scope="module")
def registered_archs(tmp_path_factory) -> None:
    register_toy_archs(tmp_path_factory.mktemp("configs"), TOY_ARCH, TOY_RESNET_ARCH)


@pytest.fixture(scope="module")
def final(toy_dir) -> OpenClipEmbedder:
    return OpenClipEmbedder(EmbedderSpec(arch="", weights=f"local-dir:{toy_dir}"), device="cpu")


@pytest.fixture(scope="module")
def layer2(toy_dir) -> OpenClipEmbedder:
    spec = EmbedderSpec(arch="", weights=f"local-dir:{toy_dir}", layer=2)
    return OpenClipEmbedder(spec, device="cpu")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    sizes = [(40, 56), (32, 32), (70, 30), (64, 64), (33, 47)]
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    out.append(Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8), mode="L"))
    return out


def _copy(toy_dir: Path, dest: Path) -> Path:
    shutil.copytree(toy_dir, dest)
    return dest


def _edit_preprocess(folder: Path, **changes) -> None:
    path = folder / "open_clip_config.json"
    config = json.loads(path.read_text())
    config["preprocess_cfg"].update(changes)
    path.write_text(json.dumps(config))


# --- spec -------------------------------------------------------------------------------------


def test_spec_round_trips_through_dict():
    spec = EmbedderSpec(arch="ViT-L-14-336", weights="/w/clip.safetensors", layer=12)
    assert EmbedderSpec.from_dict(spec.to_dict()) == spec
    assert EmbedderSpec.from_dict({"weights": "local-dir:/x"}) == EmbedderSpec("", "local-dir:/x")


@pytest.mark.parametrize("layer", [0, -1, True, "3"])
def test_spec_rejects_bad_layer_values(layer):
    with pytest.raises(RsxError):
        EmbedderSpec(arch="", weights="local-dir:/x", layer=layer)


def test_spec_from_dict_rejects_unknown_keys():
    with pytest.raises(RsxError, match="unknown"):
        EmbedderSpec.from_dict({"arch": "", "weights": "x", "layers": 3})


# --- toy model and loading routes -------------------------------------------------------------


def test_build_toy_clip_is_seeded_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b, c = build_toy_clip(0), build_toy_clip(0), build_toy_clip(1)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert len(a.visual.transformer.resblocks) == TOY_EMBEDDER_LAYER_COUNT


def test_local_dir_load_matches_the_in_memory_model(toy_dir, final, images):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    reference = build_toy_clip(0)
    loaded = final.model.state_dict()
    # the embedder keeps only the image tower (test_embedder_loading.py checks the text is gone)
    expected = reference.visual.state_dict(prefix="visual.")
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

    transform = image_transform_v2(PreprocessCfg(**reference.visual.preprocess_cfg), False)
    with torch.inference_mode():
        pixels = torch.stack([transform(im.convert("RGB")) for im in images])
        want = torch.nn.functional.normalize(reference.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(final.embed(images), want, rtol=0, atol=1e-6)
    size = TOY_CLIP_CONFIG["vision_cfg"]["image_size"]
    assert final.model.visual.preprocess_cfg["size"] == (size, size)
    assert isinstance(final.model, open_clip.CLIP)


def test_checkpoint_file_route_matches_local_dir(toy_dir, final, images, registered_archs):
    spec = EmbedderSpec(arch=TOY_ARCH, weights=str(toy_dir / WEIGHTS))
    from_file = OpenClipEmbedder(spec, device="cpu")
    # same weights, same config, same (default) preprocessing -> same identity and vectors
    assert from_file.fingerprint == final.fingerprint
    np.testing.assert_array_equal(from_file.embed(images), final.embed(images))


def test_pickled_state_dict_loads_with_weights_only(tmp_path, final, images, registered_archs):
    path = tmp_path / "toy.pt"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in build_toy_clip(0).state_dict().items()}}, path
    )
    from_pt = OpenClipEmbedder(EmbedderSpec(arch=TOY_ARCH, weights=str(path)), device="cpu")
    assert from_pt.fingerprint == final.fingerprint
    np.testing.assert_array_equal(from_pt.embed(images), final.embed(images))


class _Payload:
    unpickled = False

    def __setstate__(self, state):
        type(self).unpickled = True


def test_pickled_objects_are_never_unpickled(tmp_path, registered_archs):
    path = tmp_path / "hostile.pt"
    torch.save({"state_dict": build_toy_clip(0).state_dict(), "extra": _Payload()}, path)
    with pytest.raises(ModelLoadError, match="hostile.pt"):
        OpenClipEmbedder(EmbedderSpec(arch=TOY_ARCH, weights=str(path)), device="cpu")
    assert _Payload.unpickled is False


@pytest.mark.slow
def test_vit_b_32_with_random_weights_embeds(images):
    embedder = load_embedder(EmbedderSpec(arch="ViT-B-32", weights="random:0"), device="cpu")
    vectors = embedder.embed(images[:2])
    assert embedder.dim == 512
    assert vectors.shape == (2, 512) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# --- vectors ----------------------------------------------------------------------------------


def test_vectors_are_normalised_float32_and_deterministic(final, images):
    first = final.embed(images)
    assert first.shape == (len(images), final.dim) == (len(images), TOY_CLIP_CONFIG["embed_dim"])
    assert first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(final.embed(images), first)
    # different images give different vectors (the test above cannot pass on a constant output)
    assert not np.allclose(first[0], first[1])


def test_batch_size_does_not_change_vectors(final, layer2, images):
    for embedder in (final, layer2):
        whole = embedder.embed(images, batch_size=32)
        np.testing.assert_allclose(embedder.embed(images, batch_size=1), whole, atol=1e-5)
        np.testing.assert_allclose(embedder.embed(images, batch_size=4), whole, atol=1e-5)


def test_empty_input_and_bad_batch_size(final):
    assert final.embed([]).shape == (0, final.dim)
    with pytest.raises(RsxError):
        final.embed([], batch_size=0)


def test_pipeline_helpers_match_embed(final, images):
    pixels = final.preprocess_batch(images)
    size = TOY_CLIP_CONFIG["vision_cfg"]["image_size"]
    assert pixels.shape == (len(images), 3, size, size) and pixels.dtype == torch.float32
    np.testing.assert_array_equal(final.embed_tensors(pixels), final.embed(images))


def test_intermediate_layer_is_the_class_token_of_that_block(layer2, images):
    assert layer2.dim == TOY_CLIP_CONFIG["vision_cfg"]["width"] == 64
    captured = []
    block = layer2.model.visual.transformer.resblocks[1]
    handle = block.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        pixels = layer2.preprocess_batch(images)
        with torch.inference_mode():
            layer2.model.visual(pixels)  # a full forward pass, observed by the hook
    finally:
        handle.remove()
    want = torch.nn.functional.normalize(captured[0][:, 0], dim=-1).numpy()  # batch-first
    got = layer2.embed(images)
    assert got.shape == (len(images), 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_layers_give_different_vectors(toy_dir, layer2, images):
    spec3 = EmbedderSpec(arch="", weights=f"local-dir:{toy_dir}", layer=3)
    layer3 = OpenClipEmbedder(spec3, device="cpu")
    assert layer3.dim == layer2.dim
    assert not np.allclose(layer3.embed(images), layer2.embed(images), atol=1e-3)


# --- fingerprints -----------------------------------------------------------------------------


def test_fingerprint_is_stable_across_loads_and_device_spelling(toy_dir, final):
    if torch.cuda.is_available():
        pytest.skip("'auto' means CUDA (fp16) here, a different embedder")
    again = OpenClipEmbedder(EmbedderSpec(arch="", weights=f"local-dir:{toy_dir}"), device="auto")
    assert again.fingerprint == final.fingerprint
    assert len(final.fingerprint) == 64


def test_fingerprint_changes_with_weights_layer_and_precision(toy_dir, tmp_path, final, layer2):
    other = save_toy_clip(tmp_path / "seed1", seed=1)
    other_seed = OpenClipEmbedder(EmbedderSpec("", f"local-dir:{other}"), device="cpu")
    fp16 = OpenClipEmbedder(EmbedderSpec("", f"local-dir:{toy_dir}"), "cpu", precision="fp16")
    prints = {final.fingerprint, layer2.fingerprint, other_seed.fingerprint, fp16.fingerprint}
    assert len(prints) == 4


@pytest.mark.parametrize(
    "changes",
    [
        {"mean": [0.5, 0.5, 0.5]},
        {"std": [0.5, 0.5, 0.5]},
        {"interpolation": "bilinear"},
        {"resize_mode": "squash"},
    ],
)
def test_fingerprint_changes_with_preprocessing(toy_dir, tmp_path, final, images, changes):
    folder = _copy(toy_dir, tmp_path / "edited")
    _edit_preprocess(folder, **changes)
    edited = OpenClipEmbedder(EmbedderSpec("", f"local-dir:{folder}"), device="cpu")
    assert edited.fingerprint != final.fingerprint
    assert not np.allclose(edited.embed(images), final.embed(images), atol=1e-6)


def test_fingerprint_changes_with_image_size(tmp_path, final):
    import open_clip
    from safetensors.torch import save_file

    config = json.loads(json.dumps(TOY_CLIP_CONFIG))
    config["vision_cfg"]["image_size"] *= 2
    torch.manual_seed(0)
    model = open_clip.CLIP(**config)
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    bigger = OpenClipEmbedder(EmbedderSpec("", f"local-dir:{folder}"), device="cpu")
    doubled = 2 * TOY_CLIP_CONFIG["vision_cfg"]["image_size"]
    assert bigger.preprocess_batch([Image.new("RGB", (10, 10))]).shape[-1] == doubled
    assert bigger.fingerprint != final.fingerprint


def test_fingerprint_function_reacts_to_each_part():
    base = dict(
        weights_digest="w",
        model_config={"a": 1},
        layer=None,
        preprocess_config={"s": 1},
        precision="fp32",
    )
    variants = [
        {"weights_digest": "w2"},
        {"model_config": {"a": 2}},
        {"layer": 12},
        {"preprocess_config": {"s": 2}},
        {"precision": "fp16"},
    ]
    prints = {embedder_fingerprint(**base)}
    prints |= {embedder_fingerprint(**{**base, **v}) for v in variants}
    assert len(prints) == 1 + len(variants)
    assert embedder_fingerprint(**base) == embedder_fingerprint(**dict(base))


# --- errors -----------------------------------------------------------------------------------


def _load(arch: str, weights: str, layer: int | None = None) -> OpenClipEmbedder:
    return OpenClipEmbedder(EmbedderSpec(arch=arch, weights=weights, layer=layer), device="cpu")


def test_missing_paths_are_model_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        _load("", f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(ModelLoadError, match="does not exist"):
        _load("ViT-B-32", str(tmp_path / "missing.safetensors"))


def test_folder_without_config_or_weights(toy_dir, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(toy_dir / WEIGHTS, no_config / WEIGHTS)
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        _load("", f"local-dir:{no_config}")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(toy_dir / "open_clip_config.json", no_weights / "open_clip_config.json")
    with pytest.raises(ModelLoadError, match="no weights"):
        _load("", f"local-dir:{no_weights}")


def test_truncated_weights_are_model_load_errors(toy_dir, tmp_path, registered_archs):
    folder = _copy(toy_dir, tmp_path / "truncated")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        _load("", f"local-dir:{folder}")
    with pytest.raises(ModelLoadError, match=WEIGHTS):
        _load(TOY_ARCH, str(folder / WEIGHTS))


@pytest.mark.slow
def test_wrong_architecture_for_weights(toy_dir):
    with pytest.raises(ModelLoadError):
        _load("ViT-B-32", str(toy_dir / WEIGHTS))  # weights of another shape
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture"):
        _load("ViT-Nope-99", str(toy_dir / WEIGHTS))
    with pytest.raises(ModelLoadError, match="architecture"):
        _load("", str(toy_dir / WEIGHTS))


def test_bad_layers(toy_dir, registered_archs):
    with pytest.raises(RsxError, match="1..4"):
        _load("", f"local-dir:{toy_dir}", layer=TOY_EMBEDDER_LAYER_COUNT + 1)
    last = _load("", f"local-dir:{toy_dir}", layer=TOY_EMBEDDER_LAYER_COUNT)
    assert last.dim == 64
    with pytest.raises(RsxError, match="ViT"):
        _load(TOY_RESNET_ARCH, "random:0", layer=1)
    resnet_final = _load(TOY_RESNET_ARCH, "random:0")
    assert resnet_final.embed([Image.new("RGB", (20, 20))]).shape == (1, 32)


def test_bad_precision_and_random_seed(toy_dir):
    with pytest.raises(RsxError, match="precision"):
        OpenClipEmbedder(EmbedderSpec("", f"local-dir:{toy_dir}"), "cpu", precision="fp8")
    with pytest.raises(RsxError, match="seed"):
        _load("ViT-B-32", "random:abc")
