"""Issue 12, item 2: a CLIP checkpoint is loaded into an empty model, and only the image tower is
kept. The weights, fingerprints and vectors must be bit-identical to the old way of loading (random
initialisation from a seed, then the checkpoint copied over it), which each test rebuilds here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from toy_archs import register_toy_archs

from resynth_index.errors import ModelLoadError
from resynth_index.models import embedders
from resynth_index.models.embedders import (
    EmbedderSpec,
    OpenClipEmbedder,
    embedder_fingerprint,
    load_embedder,
)
from resynth_index.models.fingerprints import hash_state_dict
from resynth_index.models.toyzoo.clip import (
    TOY_CLIP_CONFIG,
    WEIGHTS_FILENAME,
    build_toy_clip,
    install_toy_clip,
    save_toy_clip,
)

TOY_ARCH = "rsx-loading-toy-clip"
TOY_RESNET_ARCH = "rsx-loading-toy-resnet"

# every in-place initialiser torch.nn.init offers; open_clip and torch.nn layers call them
INIT_FUNCTIONS = (
    "normal_",
    "uniform_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
    "sparse_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
)
# the aten operators that draw random numbers (torch.randn, Tensor.normal_, nn.init.*, ...)
RANDOM_OPS = {
    "normal",
    "normal_",
    "uniform_",
    "randn",
    "rand",
    "randint",
    "random_",
    "randperm",
    "bernoulli",
    "bernoulli_",
    "exponential_",
    "cauchy_",
    "log_normal_",
    "geometric_",
}


@pytest.fixture(scope="module")
def registered_archs(tmp_path_factory) -> None:
    register_toy_archs(tmp_path_factory.mktemp("configs"), TOY_ARCH, TOY_RESNET_ARCH)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return save_toy_clip(tmp_path_factory.mktemp("toy"), seed=0)


@pytest.fixture(scope="module")
def toy_pt(tmp_path_factory) -> Path:
    """The toy weights as a pickled training checkpoint ('state_dict', 'module.' prefixes)."""
    path = tmp_path_factory.mktemp("pt") / "toy.pt"
    state = {f"module.{k}": v for k, v in build_toy_clip(0).state_dict().items()}
    torch.save({"state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory, registered_archs) -> Path:
    """Tiny ResNet weights with non-default BatchNorm statistics, so buffers are checked too."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = open_clip.create_model(TOY_RESNET_ARCH, pretrained=None, load_weights=False)
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    path = tmp_path_factory.mktemp("resnet") / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    sizes = [(40, 56), (64, 64), (70, 30)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _old_model(model_name: str, precision: str, checkpoint: Path | None, seed: int = 0):
    """The model as embedders.py loaded it before issue 12: open_clip's random initialisation
    from ``seed``, the whole CLIP, then the checkpoint (if any) copied over it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(
            model_name,
            pretrained=None,
            load_weights=False,
            precision=precision,
            device="cpu",
            pretrained_image=False,
            pretrained_text=False,
        )
    if checkpoint is not None and checkpoint.suffix == ".safetensors":
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    elif checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


def _old_fingerprint(old, model_config, layer, precision) -> str:
    return embedder_fingerprint(
        weights_digest=hash_state_dict(old.visual.state_dict()),
        model_config=model_config,
        layer=layer,
        preprocess_config=old.visual.preprocess_cfg,
        precision=precision,
    )


def _assert_same_as_old(new: OpenClipEmbedder, old, model_config, images) -> None:
    """Same image-tower weights (dtype, values, layout), fingerprint and vectors, bit for bit.

    Only the image tower is compared, so this holds for the old loader too (a regression check);
    that the text tower is gone is `test_only_the_image_tower_is_kept`'s business.
    """
    got, want = new.model.visual.state_dict(), old.visual.state_dict()
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].is_contiguous(), key
        assert torch.equal(got[key], tensor), key
    assert new.fingerprint == _old_fingerprint(old, model_config, new.layer, new.precision)
    vectors = new.embed(images)
    kept = new.model
    try:
        new.model = old  # the very same inference code, run on the old full model
        np.testing.assert_array_equal(vectors, new.embed(images))
    finally:
        new.model = kept


class _RandomDraws(TorchDispatchMode):
    """Counts random-number operators that write real (not meta) tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.real: Counter[str] = Counter()
        self.meta: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in RANDOM_OPS and isinstance(out, torch.Tensor):
            (self.meta if out.is_meta else self.real)[name] += 1
        return out


@pytest.fixture
def init_calls(monkeypatch) -> dict[str, Counter[str]]:
    """Count every torch.nn.init call, split by whether it wrote a real or a meta tensor."""
    calls: dict[str, Counter[str]] = {"real": Counter(), "meta": Counter()}
    for name in INIT_FUNCTIONS:
        original = getattr(torch.nn.init, name)

        def counting(tensor, *args, _name=name, _original=original, **kwargs):
            calls["meta" if tensor.is_meta else "real"][_name] += 1
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, counting)
    return calls


def _specs(toy_dir: Path, toy_pt: Path) -> dict[str, EmbedderSpec]:
    return {
        "local-dir": EmbedderSpec("", f"local-dir:{toy_dir}"),
        "safetensors": EmbedderSpec(TOY_ARCH, str(toy_dir / WEIGHTS_FILENAME)),
        "pickle": EmbedderSpec(TOY_ARCH, str(toy_pt)),
    }


# --- no initialisation ------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["local-dir", "safetensors", "pickle"])
def test_checkpoint_load_runs_no_weight_init(route, toy_dir, toy_pt, registered_archs, init_calls):
    spec = _specs(toy_dir, toy_pt)[route]
    draws = _RandomDraws()
    with draws:
        embedder = load_embedder(spec, device="cpu")
    # open_clip's constructors still call nn.init, but only on storage-less meta tensors
    assert init_calls["real"] == Counter()
    assert draws.real == Counter()
    assert draws.meta  # the counter works: the empty build did pass through the initialisers
    assert not embedders._meta_tensors(embedder.model)


def test_the_counters_see_the_old_initialisation(init_calls, registered_archs):
    """The counters above are not blind: the old way initialises real tensors, a lot."""
    draws = _RandomDraws()
    with draws:
        _old_model(TOY_ARCH, "fp32", None)
    assert sum(init_calls["real"].values()) > 20
    assert draws.real["normal_"] > 10


def test_loading_leaves_the_global_rng_alone(toy_dir):
    before = torch.random.get_rng_state()
    load_embedder(EmbedderSpec("", f"local-dir:{toy_dir}"), device="cpu")
    assert torch.equal(torch.random.get_rng_state(), before)


# --- same weights, fingerprints and vectors as the old way --------------------------------------


@pytest.mark.parametrize(
    ("route", "precision", "layer"),
    [
        ("local-dir", "fp32", None),
        ("local-dir", "fp32", 2),
        ("local-dir", "fp16", None),
        ("local-dir", "bf16", 3),
        ("safetensors", "fp32", None),
        ("safetensors", "fp16", 4),
        ("pickle", "fp32", 1),
        ("pickle", "bf16", None),
    ],
)
def test_same_as_the_initialised_load(
    route, precision, layer, toy_dir, toy_pt, registered_archs, images
):
    spec = _specs(toy_dir, toy_pt)[route]
    spec = EmbedderSpec(spec.arch, spec.weights, layer)
    new = OpenClipEmbedder(spec, device="cpu", precision=precision)
    name = spec.arch or f"local-dir:{toy_dir}"
    checkpoint = toy_pt if route == "pickle" else toy_dir / WEIGHTS_FILENAME
    old = _old_model(name, precision, checkpoint)
    _assert_same_as_old(new, old, TOY_CLIP_CONFIG, images)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resnet_tower_and_its_buffers(precision, resnet_file, images):
    new = OpenClipEmbedder(EmbedderSpec(TOY_RESNET_ARCH, str(resnet_file)), "cpu", precision)
    old = _old_model(TOY_RESNET_ARCH, precision, resnet_file)
    config = open_clip.get_model_config(TOY_RESNET_ARCH)
    _assert_same_as_old(new, old, config, images)
    assert any(name.endswith("num_batches_tracked") for name in new.model.state_dict())


def test_odd_checkpoint_tensors_are_loaded_like_copies(tmp_path, registered_archs, images):
    """fp16 tensors into an fp32 model, non-contiguous tensors and views into one shared block:
    copying made each an owned, contiguous tensor of the model's dtype, and so must assigning."""
    state = build_toy_clip(0).state_dict()
    odd, kinds = {}, Counter()
    flat = torch.cat([v.reshape(-1) for v in state.values()])  # one block for every tensor
    offset = 0
    turns = Counter()  # take turns among tensors of each rank
    for key, value in state.items():
        rank = min(value.ndim, 2)
        kind = (("half", "shared"), ("half", "shared"), ("transposed", "shared", "half"))[rank]
        kind = kind[turns[rank] % len(kind)]
        turns[rank] += 1
        if kind == "transposed":  # same values, column-major strides
            odd[key] = value.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif kind == "shared":
            odd[key] = flat[offset : offset + value.numel()].view_as(value)
        else:
            odd[key] = value.half()
        kinds[kind] += key.startswith("visual.")
        offset += value.numel()
    assert min(kinds.values()) >= 3  # each kind reaches the image tower
    path = tmp_path / "odd.pt"
    torch.save(odd, path)
    new = OpenClipEmbedder(EmbedderSpec(TOY_ARCH, str(path)), device="cpu")
    _assert_same_as_old(new, _old_model(TOY_ARCH, "fp32", path), TOY_CLIP_CONFIG, images)
    for key, tensor in new.model.state_dict().items():
        assert tensor.untyped_storage().nbytes() == tensor.nbytes, key


def test_weights_do_not_follow_the_file_after_loading(tmp_path, toy_dir, images):
    """safetensors maps the file; the embedder must own its weights, as the copying load did, or
    rewriting the file in place would change the vectors under an unchanged fingerprint."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("open_clip_config.json", WEIGHTS_FILENAME):
        (folder / name).write_bytes((toy_dir / name).read_bytes())
    embedder = load_embedder(EmbedderSpec("", f"local-dir:{folder}"), device="cpu")
    before = embedder.embed(images)
    weights = folder / WEIGHTS_FILENAME
    size = weights.stat().st_size
    with weights.open("r+b") as handle:  # same inode, new bytes: zeros over the second half
        handle.seek(size // 2)
        handle.write(bytes(size - size // 2))
    np.testing.assert_array_equal(embedder.embed(images), before)
    digest = hash_state_dict(embedder.model.visual.state_dict())
    assert embedder.fingerprint == _old_fingerprint(embedder.model, TOY_CLIP_CONFIG, None, "fp32")
    assert digest == hash_state_dict(build_toy_clip(0).visual.state_dict())


# --- only the image tower ---------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["checkpoint", "random"])
def test_only_the_image_tower_is_kept(weights, toy_dir, registered_archs, images):
    spec = (
        EmbedderSpec("", f"local-dir:{toy_dir}")
        if weights == "checkpoint"
        else EmbedderSpec(TOY_ARCH, "random:0")
    )
    embedder = OpenClipEmbedder(spec, device="cpu")
    model = embedder.model
    assert [name for name, _ in model.named_children()] == ["visual"]
    assert all(key.startswith("visual.") for key in model.state_dict())
    assert all(name.startswith("visual.") for name, _ in model.named_buffers())
    for text_part in ("transformer", "token_embedding", "ln_final", "text_projection", "attn_mask"):
        assert not hasattr(model, text_part)
    reference = build_toy_clip(0)
    kept = sum(p.numel() for p in model.parameters())
    assert kept == sum(p.numel() for p in reference.visual.parameters())
    assert kept < sum(p.numel() for p in reference.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert "load_state_dict" not in vars(model)  # the capture in _open_clip_state_dict is gone
    assert embedder.embed(images).shape == (len(images), TOY_CLIP_CONFIG["embed_dim"])


# --- random weights: drawn exactly as before --------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "weights", "precision"),
    [
        (TOY_ARCH, "random:0", "fp32"),
        (TOY_ARCH, "random:5", "fp16"),
        (TOY_RESNET_ARCH, "random:3", "fp32"),
    ],
)
def test_random_weights_are_drawn_as_before(arch, weights, precision, registered_archs, images):
    new = OpenClipEmbedder(EmbedderSpec(arch, weights), device="cpu", precision=precision)
    old = _old_model(arch, precision, None, seed=int(weights.split(":")[1]))
    _assert_same_as_old(new, old, open_clip.get_model_config(arch), images)


def test_toy_lab_embedder_fingerprint_is_unchanged(tmp_path):
    """A lab made with ``--embedder toy``: its model folder's fingerprint is the old one."""
    spec = install_toy_clip(tmp_path)
    folder = tmp_path / spec.weights.removeprefix("local-dir:")
    embedder = load_embedder(EmbedderSpec("", f"local-dir:{folder}"), "cpu", "fp32")
    old = _old_model(f"local-dir:{folder}", "fp32", folder / WEIGHTS_FILENAME)
    assert embedder.fingerprint == _old_fingerprint(old, TOY_CLIP_CONFIG, None, "fp32")
    # the toy model itself is still the seeded random init of the full CLIP
    seeded = _old_model(f"local-dir:{folder}", "fp32", None, seed=0)
    assert embedder.fingerprint == _old_fingerprint(seeded, TOY_CLIP_CONFIG, None, "fp32")


# --- falling back to the initialised build ----------------------------------------------------


def _patch_vision_init(monkeypatch, extra) -> None:
    from open_clip.transformer import VisionTransformer

    original = VisionTransformer.__init__

    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        extra(self)

    monkeypatch.setattr(VisionTransformer, "__init__", patched)


def _non_persistent_buffer(module) -> None:
    module.register_buffer("rsx_probe", torch.arange(4.0) * 2, persistent=False)


def _needs_real_values(module) -> None:
    module.rsx_rate = torch.linspace(0, 1, 3)[1].item()  # fails on meta tensors, like timm's


@pytest.mark.parametrize("extra", [_non_persistent_buffer, _needs_real_values])
def test_towers_that_cannot_be_built_empty_are_initialised(
    extra, monkeypatch, toy_dir, images, init_calls
):
    _patch_vision_init(monkeypatch, extra)
    embedder = OpenClipEmbedder(EmbedderSpec("", f"local-dir:{toy_dir}"), device="cpu")
    assert init_calls["real"]  # the initialised build was used
    assert not embedders._meta_tensors(embedder.model)
    if extra is _non_persistent_buffer:
        assert torch.equal(embedder.model.visual.rsx_probe, torch.arange(4.0) * 2)
    else:
        assert embedder.model.visual.rsx_rate == 0.5
    old = _old_model(f"local-dir:{toy_dir}", "fp32", toy_dir / WEIGHTS_FILENAME)
    _assert_same_as_old(embedder, old, TOY_CLIP_CONFIG, images)


def test_a_loader_that_reads_the_empty_model_falls_back(monkeypatch, toy_dir, images, init_calls):
    """Should open_clip's checkpoint conversions ever copy a value out of the (empty) model, the
    meta tensor it produced is noticed and the model is loaded the initialised way."""
    original = embedders._open_clip_state_dict

    def leaky(model, checkpoint):
        state = original(model, checkpoint)
        if model.visual.proj.is_meta:
            state["visual.proj"] = model.visual.proj.detach()
        return state

    monkeypatch.setattr(embedders, "_open_clip_state_dict", leaky)
    embedder = OpenClipEmbedder(EmbedderSpec("", f"local-dir:{toy_dir}"), device="cpu")
    assert init_calls["real"]
    old = _old_model(f"local-dir:{toy_dir}", "fp32", toy_dir / WEIGHTS_FILENAME)
    _assert_same_as_old(embedder, old, TOY_CLIP_CONFIG, images)


# --- untrusted checkpoints --------------------------------------------------------------------


class _Payload:
    unpickled = False

    def __setstate__(self, state):
        type(self).unpickled = True


def test_hostile_pickle_in_a_folder_is_not_unpickled(tmp_path, toy_dir):
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((toy_dir / "open_clip_config.json").read_text())
    torch.save({"state_dict": build_toy_clip(0).state_dict(), "x": _Payload()}, folder / "m.bin")
    with pytest.raises(ModelLoadError, match="not unpickled"):
        load_embedder(EmbedderSpec("", f"local-dir:{folder}"), device="cpu")
    assert _Payload.unpickled is False


def test_pickle_loads_use_weights_only(monkeypatch, toy_pt, registered_archs):
    seen = []
    original = torch.load

    def spying(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spying)
    load_embedder(EmbedderSpec(TOY_ARCH, str(toy_pt)), device="cpu")
    assert seen == [True]


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_checkpoints_are_still_checked_strictly(damage, tmp_path, registered_archs):
    """Keys and shapes of the whole CLIP are checked as before, text tower included, although
    the text tower is dropped afterwards."""
    state = build_toy_clip(0).state_dict()
    if damage == "missing":
        del state["token_embedding.weight"]
    elif damage == "extra":
        state["visual.rsx_extra"] = torch.zeros(1)
    else:
        state["ln_final.weight"] = torch.zeros(3)
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="damaged.pt"):
        load_embedder(EmbedderSpec(TOY_ARCH, str(path)), device="cpu")
