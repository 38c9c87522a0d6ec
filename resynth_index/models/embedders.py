"""CLIP image embedders (open_clip): final or intermediate-layer features, and their fingerprint.

Attribution compares a query's embedding with its resyntheses' embeddings, so every vector must be
reproducible and tagged with exactly what produced it. An embedder is described by an
`EmbedderSpec` (architecture, weights, layer) and identified by `fingerprint`, a digest of the
image tower's weights, the model config, the layer, the preprocessing and the precision: vectors
with different fingerprints are never compared.

Weights can be given three ways:

- ``"local-dir:/path/to/folder"``: a folder holding ``open_clip_config.json``
  (``{"model_cfg": ..., "preprocess_cfg": ...}``) and a checkpoint. The architecture comes from the
  folder's config, so ``arch`` is left empty (it is ignored for such folders).
- ``"/path/to/file.safetensors"`` (or ``.pt`` / ``.pth`` / ``.bin``): a checkpoint file for the
  named open_clip architecture ``arch`` (a built-in name or one registered with
  ``open_clip.add_model_config``). Pickled checkpoints are read with ``weights_only=True`` only.
- ``"random:<seed>"``: random weights for ``arch`` drawn from the seed (benchmarks and tests).

A checkpoint is loaded into a model built empty (no random initialisation to overwrite), and only
the image tower is kept, on the device: nothing embeds text. Weights and vectors are bit-identical
to building the whole CLIP initialised and copying the checkpoint over it (see `_load_open_clip`).

Layer ``N`` (1-based) is the class token of the output of vision transformer block ``N``
(``model.visual.transformer.resblocks[N-1]``), before the final LayerNorm and projection; the
forward pass stops after that block. ``layer=None`` is the projected final embedding.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from resynth_index.errors import ModelLoadError, RsxError
from resynth_index.models.devices import resolve_device
from resynth_index.models.fingerprints import combine, hash_json
from resynth_index.models.weights_digests import stats_before_loading, weights_digest

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from resynth_index.hashing import FileDigests

LOCAL_DIR_PREFIX = "local-dir:"
RANDOM_WEIGHTS_PREFIX = "random:"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
FINGERPRINT_VERSION = "rsx-openclip-embedder-v1"
#: Part of the key a remembered weights digest is found by (``models/weights_digests.py``): bump
#: it whenever the loading code could make other tensors of the same files.
WEIGHTS_LOADER_VERSION = "rsx-openclip-loader-v1"

_CONFIG_FILENAME = "open_clip_config.json"
# the checkpoint names open_clip's own local-dir loader prefers, best first
_PREFERRED_CHECKPOINTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass(frozen=True)
class EmbedderSpec:
    """What to load: an open_clip architecture, its weights and which feature layer to read.

    ``arch`` is an open_clip architecture name such as ``"ViT-L-14-336"`` (empty for a
    ``local-dir:`` folder, whose config names the architecture). ``weights`` is a checkpoint file,
    ``"local-dir:<folder>"`` or ``"random:<seed>"``. ``layer`` is ``None`` for the final projected
    embedding, or the 1-based index of a vision transformer block whose class token is used.
    """

    arch: str
    weights: str
    layer: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not isinstance(self.weights, str):
            raise RsxError("an embedder spec needs 'arch' and 'weights' as strings")
        if not self.weights:
            raise RsxError(
                "an embedder spec needs 'weights' (a file, local-dir:<folder> or random:N)"
            )
        if self.layer is not None and (
            isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1
        ):
            raise RsxError(f"embedder layer must be a positive block number, not {self.layer!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "weights": self.weights, "layer": self.layer}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbedderSpec:
        unknown = set(data) - {"arch", "weights", "layer"}
        if unknown:
            raise RsxError(f"unknown embedder spec keys: {', '.join(sorted(unknown))}")
        if "weights" not in data:
            raise RsxError("an embedder spec needs 'weights'")
        return cls(arch=data.get("arch", ""), weights=data["weights"], layer=data.get("layer"))


class Embedder(Protocol):
    """Turns images into L2-normalised float32 vectors; ``fingerprint`` names what made them."""

    fingerprint: str
    dim: int
    precision: str  # concrete: fp32, fp16 or bf16

    def embed(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray: ...


def embedder_fingerprint(
    *,
    weights_digest: str,
    model_config: Mapping[str, Any],
    layer: int | None,
    preprocess_config: Mapping[str, Any],
    precision: str,
) -> str:
    """Digest of everything that determines an embedding vector (and nothing else).

    ``weights_digest`` is `hash_state_dict` of the image tower. Device and batch size are left
    out on purpose: they do not change the vectors beyond float noise. Precision is included
    because fp16 weights do.
    """
    return combine(
        FINGERPRINT_VERSION,
        weights_digest,
        hash_json(dict(model_config)),
        "final" if layer is None else f"layer:{layer}",
        hash_json(dict(preprocess_config)),
        precision,
    )


class OpenClipEmbedder:
    """An open_clip image tower in eval mode, loaded offline from local weights.

    ``preprocess`` is open_clip's evaluation transform (resize, centre crop, normalise) for the
    model's image size, mean, std, interpolation and resize mode.

    ``digests`` (the lab's memory of digests) gives the SHA-256 of the weight files; when it also
    remembers weights digests, the image tower's digest is recalled from it rather than computed
    (``models/weights_digests.py``). The fingerprint is the same either way.
    """

    def __init__(
        self,
        spec: EmbedderSpec,
        device: str = "auto",
        precision: str = "auto",
        *,
        digests: FileDigests | None = None,
    ) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        source = _resolve_weights(spec)
        before = stats_before_loading(source.files, digests)
        model, preprocess, model_config = _load_open_clip(spec, self.device, self.precision, source)
        self.model = model
        self.preprocess = preprocess
        self.layer = spec.layer
        if spec.layer is None:
            self.dim = int(model_config["embed_dim"])
        else:
            self.dim = int(_check_layer(model, spec).width)
        size = model.visual.preprocess_cfg["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        conv = getattr(model.visual, "conv1", None)
        self._input_dtype = conv.weight.dtype if conv is not None else _torch().float32
        self._model_config = model_config
        self._weights_digest = weights_digest(
            model.visual,
            files=source.files,
            before=before,
            context=_load_context(model_config, self.device, self.precision),
            digests=digests,
        )
        self.fingerprint = self.fingerprint_at(spec.layer)

    def fingerprint_at(self, layer: int | None) -> str:
        """The fingerprint this embedder would have read at vision block ``layer`` (None: the
        final embedding): the same weights, config, preprocessing and precision."""
        return embedder_fingerprint(
            weights_digest=self._weights_digest,
            model_config=self._model_config,
            layer=layer,
            preprocess_config=self.model.visual.preprocess_cfg,
            precision=self.precision,
        )

    def preprocess_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess images on the CPU into one (n, 3, H, W) float32 tensor."""
        torch = _torch()
        if not images:
            return torch.empty((0, 3, *self.image_size), dtype=torch.float32)
        return torch.stack([self.preprocess(_as_rgb(image)) for image in images])

    def embed_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed an already-preprocessed batch; float32 (n, dim), rows L2-normalised."""
        torch = _torch()
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            if str(self.device).startswith("cuda") and pixels.device.type == "cpu":
                # page-locked memory copies asynchronously: the host is free while it travels
                pixels = pixels.pin_memory()
                batch = pixels.to(device=self.device, non_blocking=True)
                batch = batch.to(dtype=self._input_dtype)
            else:  # the CPU: nothing to copy
                batch = pixels.to(device=self.device, dtype=self._input_dtype)
            if self.layer is None:
                features = self.model.encode_image(batch)
            else:
                out = self.model.visual.forward_intermediates(
                    batch,
                    indices=[self.layer - 1],
                    stop_early=True,
                    intermediates_only=True,
                    output_fmt="NLC",
                    output_extra_tokens=True,
                )
                features = out["image_intermediates_prefix"][0][:, 0]
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            return features.cpu().numpy().astype(np.float32, copy=False)

    def embed(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Embed PIL images; float32 (n, dim), each row L2-normalised, deterministic."""
        if batch_size < 1:
            raise RsxError(f"batch size must be at least 1, not {batch_size}")
        chunks = [
            self.embed_tensors(self.preprocess_batch(images[start : start + batch_size]))
            for start in range(0, len(images), batch_size)
        ]
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks, axis=0)


def load_embedder(
    spec: EmbedderSpec,
    device: str = "auto",
    precision: str = "auto",
    *,
    digests: FileDigests | None = None,
) -> Embedder:
    """The embedder for ``spec`` on ``device`` ("auto" picks CUDA, then MPS, then CPU).

    ``precision`` is part of the fingerprint; "auto" is fp16 on CUDA and fp32 elsewhere
    (``resolve_precision``), so a lab records the concrete precision it was created with and
    passes that, never "auto", when it opens (fp16 also runs on a CPU, only slower).
    ``digests``: the lab's memory of digests (see ``OpenClipEmbedder``).
    """
    return OpenClipEmbedder(spec, device=device, precision=precision, digests=digests)


def weight_files(spec: EmbedderSpec) -> tuple[Path, ...]:
    """The files loading ``spec`` reads (a folder's config and checkpoint, a checkpoint file;
    none for random weights), found without reading them or importing open_clip (a Ray
    coordinator lends their digests). ModelLoadError for a folder without a checkpoint."""
    if spec.weights.startswith(LOCAL_DIR_PREFIX):
        folder = Path(spec.weights[len(LOCAL_DIR_PREFIX) :]).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"CLIP model folder {folder} does not exist")
        return (folder / _CONFIG_FILENAME, _find_folder_checkpoint(folder))
    if spec.weights.startswith(RANDOM_WEIGHTS_PREFIX):
        return ()
    return (Path(spec.weights).expanduser(),)


# --- loading ---------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def resolve_precision(precision: str, device: str) -> str:
    """The concrete precision for ``device`` (a concrete torch device): "auto" is fp16 on CUDA,
    fp32 elsewhere. RsxError for an unknown name."""
    if precision not in PRECISIONS:
        raise RsxError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    return precision


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_layer(model: Any, spec: EmbedderSpec) -> Any:
    """The vision transformer stack, after checking that ``spec.layer`` exists in it."""
    from open_clip.transformer import VisionTransformer

    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise RsxError(
            f"intermediate layers need a ViT image tower, but {spec.arch or spec.weights} "
            f"has a {type(visual).__name__}"
        )
    count = len(visual.transformer.resblocks)
    if spec.layer is None or not 1 <= spec.layer <= count:
        raise RsxError(
            f"layer {spec.layer} does not exist: {spec.arch or spec.weights} has {count} "
            f"vision transformer blocks (use 1..{count})"
        )
    return visual.transformer


def _builtin_config(arch: str, weights: str) -> dict[str, Any]:
    import open_clip

    if not arch:
        raise ModelLoadError(f"weights {weights} need an open_clip architecture name (arch)")
    if arch.startswith(("hf-hub:", LOCAL_DIR_PREFIX)):
        raise ModelLoadError(
            f"architecture {arch!r} is not an open_clip model name; "
            "put a local folder in weights as local-dir:<folder>"
        )
    config = open_clip.get_model_config(arch.replace("/", "-"))
    if config is None:
        raise ModelLoadError(
            f"unknown open_clip architecture {arch!r} (see open_clip.list_models())"
        )
    return config


def _read_folder_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ModelLoadError(f"CLIP model folder {folder} does not exist")
    config_path = folder / _CONFIG_FILENAME
    if not config_path.is_file():
        raise ModelLoadError(f"CLIP model folder {folder} has no {_CONFIG_FILENAME}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not readable JSON: {_first_line(exc)}") from exc
    model_config = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_config, dict):
        raise ModelLoadError(f"{config_path} has no 'model_cfg' object")
    return model_config


def _find_folder_checkpoint(folder: Path) -> Path:
    """The folder's checkpoint: safetensors first, then open_clip's preferred names."""
    for name in _PREFERRED_CHECKPOINTS:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES),
        key=lambda p: (p.suffix != ".safetensors", p.name),
    )
    if not candidates:
        raise ModelLoadError(f"CLIP model folder {folder} holds no weights file")
    return candidates[0]


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Hide open_clip's 'initialized randomly' warning: it is printed whenever open_clip is not
    given the checkpoint itself, which is always (see `_load_open_clip`)."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class _Weights(NamedTuple):
    """Where ``spec``'s weights come from, resolved before anything is loaded."""

    model_config: dict[str, Any]
    checkpoint: Path | None
    model_name: str  # what open_clip builds from: a built-in name or local-dir:<folder>
    source: str  # for messages
    seed: int
    files: tuple[Path, ...]  # every file the load reads


def _resolve_weights(spec: EmbedderSpec) -> _Weights:
    """The config, checkpoint and open_clip model name of ``spec`` (the checkpoint is not read)."""
    if spec.weights.startswith(LOCAL_DIR_PREFIX):
        folder = Path(spec.weights[len(LOCAL_DIR_PREFIX) :]).expanduser()
        model_config = _read_folder_config(folder)
        files = weight_files(spec)  # the config (open_clip reads it again) and the checkpoint
        return _Weights(
            model_config, files[1], f"{LOCAL_DIR_PREFIX}{folder}", str(folder), 0, files
        )
    if spec.weights.startswith(RANDOM_WEIGHTS_PREFIX):
        seed_text = spec.weights[len(RANDOM_WEIGHTS_PREFIX) :]
        if not seed_text.isdigit():
            raise RsxError(f"random weights need an integer seed (random:0), not {spec.weights!r}")
        model_config = _builtin_config(spec.arch, spec.weights)
        source = f"{spec.arch} ({spec.weights})"
        return _Weights(model_config, None, spec.arch.replace("/", "-"), source, int(seed_text), ())
    checkpoint = Path(spec.weights).expanduser()
    if not checkpoint.is_file():
        raise ModelLoadError(f"CLIP weights file {checkpoint} does not exist")
    model_config = _builtin_config(spec.arch, spec.weights)
    model_name = spec.arch.replace("/", "-")
    return _Weights(model_config, checkpoint, model_name, str(checkpoint), 0, weight_files(spec))


def _load_context(model_config: Mapping[str, Any], device: str, precision: str) -> list[str]:
    """What, besides the files' bytes, decides the tensors a load makes (the key of a remembered
    weights digest): this loader's version, the libraries', the config, precision and device
    type (where an fp16 cast runs)."""
    import open_clip

    torch = _torch()
    return [
        WEIGHTS_LOADER_VERSION,
        f"open_clip {open_clip.__version__}",
        f"torch {torch.__version__}",
        hash_json(dict(model_config)),
        precision,
        torch.device(device).type,
    ]


def _load_open_clip(
    spec: EmbedderSpec, device: str, precision: str, weights: _Weights | None = None
) -> tuple[Any, Any, dict]:
    """Build the model through open_clip's factory, load the weights safely ourselves, and keep
    only the image tower, on ``device``. ``weights``: ``spec`` already resolved.

    open_clip is never given the checkpoint: for pickled files its loader falls back to an unsafe
    ``torch.load`` on some errors, so safetensors go through ``open_clip.load_checkpoint`` and
    everything else through ``torch.load(weights_only=True)``.

    With a checkpoint, the model is built empty (`_build_empty`) and the checkpoint's tensors are
    assigned to it, so no random initialisation is drawn only to be overwritten (for ViT-L/14@336
    that init cost 3 s). ``random:<seed>`` weights are still drawn exactly as before, from the
    seed, because they are the weights. Either way the text tower is dropped before anything
    moves to ``device``: only images are embedded, and the fingerprint covers the image tower only.
    """
    model_config, checkpoint, model_name, source, seed, _ = weights or _resolve_weights(spec)
    built = None
    if checkpoint is not None:
        built = _build_empty(model_name, precision)
        if built is not None:
            _load_checkpoint(built[0], checkpoint, assign_on=device)
            if _meta_tensors(built[0].visual):
                # a conversion in open_clip's loader read the empty model's values (none known)
                _log.debug("open_clip left %s partly unloaded; loading it the slow way", source)
                built = None
    if built is not None:
        model, preprocess = built
    else:
        model, preprocess = _build_initialised(model_name, source, precision, seed)
        if checkpoint is not None:
            _load_checkpoint(model, checkpoint)
    _keep_image_tower(model)
    model.to(device)
    model.eval()
    return model, preprocess, model_config


def _create(model_name: str, precision: str, device: str) -> tuple[Any, Any]:
    import open_clip

    with _quiet_random_init_warning():
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=None,
            load_weights=False,
            precision=precision,
            device=device,
            pretrained_image=False,
            pretrained_text=False,
            weights_only=True,
        )
    return model, preprocess


def _build_initialised(model_name: str, source: str, precision: str, seed: int) -> tuple[Any, Any]:
    """The model with open_clip's random initialisation drawn from ``seed``, on the CPU.

    This is how every model was built before `_build_empty` existed, and it stays the only way
    for ``random:<seed>`` weights: the vision tower is created, and draws its random numbers,
    before the text tower, so dropping the text tower afterwards leaves those weights (and the
    fingerprints of labs made with them) exactly as they were. The global RNG is left alone.
    """
    torch = _torch()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _create(model_name, precision, "cpu")
    except Exception as exc:  # open_clip raises bare RuntimeError/ValueError/TypeError
        raise ModelLoadError(
            f"could not build the CLIP model {source}: {_first_line(exc)}"
        ) from exc


def _build_empty(model_name: str, precision: str) -> tuple[Any, Any] | None:
    """The model with the final dtypes but no storage (on the "meta" device), or None.

    Constructing under ``torch.device("meta")`` makes every ``torch.randn`` and ``nn.init`` call
    in open_clip's constructors a no-op on storage-less tensors, so nothing is drawn or written;
    the checkpoint's tensors are then assigned (`_assign_weights`). The device context is a
    thread-local torch function mode, so other threads building models meanwhile are unaffected.

    None when that cannot work and the caller must build the model initialised: the constructor
    needed real values (e.g. a timm tower calling ``.item()``), or the image tower holds tensors
    that no checkpoint carries (non-persistent buffers, plain tensor attributes), which would
    stay empty. Errors are not reported here; the initialised build repeats them in full.
    """
    torch = _torch()
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model, preprocess = _create(model_name, precision, "meta")
    except Exception as exc:
        _log.debug("cannot build %s empty (%s); initialising it", model_name, _first_line(exc))
        return None
    if _meta_tensors(model.visual, include_state=False):
        _log.debug("%s holds tensors no checkpoint fills; initialising it", model_name)
        return None
    return model, preprocess


def _meta_tensors(module: Any, include_state: bool = True) -> list[str]:
    """Names of the storage-less tensors in ``module``: its parameters and buffers (only those
    outside the state dict when ``include_state`` is False) and plain tensor attributes."""
    torch = _torch()
    in_state = set(module.state_dict()) if not include_state else set()
    found = [
        name
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
        if tensor.is_meta and name not in in_state
    ]
    for prefix, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                found.append(f"{prefix}.{attr}" if prefix else attr)
    return found


def _keep_image_tower(model: Any) -> None:
    """Delete everything from the CLIP model but its image tower ``visual``.

    The text tower (``transformer``, ``token_embedding``, ... or ``text``), the logit scale and
    the text attention mask are never used to embed images (nothing in rsx calls
    ``encode_text``), so they would only take memory on the device. ``encode_image`` and
    ``model.visual`` keep working; ``encode_text`` raises AttributeError.
    """
    for name, _ in list(model.named_children()):
        if name != "visual":
            delattr(model, name)
    for name, _ in [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)]:
        delattr(model, name)


def _load_checkpoint(model: Any, checkpoint: Path, *, assign_on: str | None = None) -> None:
    """Load ``checkpoint`` into ``model``: copy its tensors into an initialised model, or, with
    ``assign_on`` (a device), assign them to an empty one (`_build_empty`), the image tower's
    placed on that device. Every failure is a ModelLoadError naming the file."""
    import torch

    try:
        if checkpoint.suffix == ".safetensors":
            state = _open_clip_state_dict(model, checkpoint)
        else:
            loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = _plain_state_dict(loaded, checkpoint)
        if assign_on is not None:
            _assign_weights(model, state, assign_on)
        else:
            model.load_state_dict(state, strict=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"CLIP weights {checkpoint} hold more than plain tensors and were not unpickled "
            "(only weights_only checkpoints or .safetensors are accepted)"
        ) from exc
    except ModelLoadError:
        raise
    except Exception as exc:  # truncated files, wrong architecture, missing keys
        raise ModelLoadError(
            f"could not load CLIP weights {checkpoint}: {_first_line(exc)}"
        ) from exc


def _open_clip_state_dict(model: Any, checkpoint: Path) -> dict[str, Any]:
    """The state dict ``open_clip.load_checkpoint`` would load from a .safetensors file.

    Its loader reads the file with safetensors and then adapts the dict to the model (third-party
    layouts, position embeddings resized to the model's grid, logit scale shapes) before its final
    ``model.load_state_dict`` call. That call is captured instead of run, so those adaptations
    stay exactly open_clip's, and the caller decides how the tensors get into the model. They only
    read the model's shapes, which an empty model has.
    """
    import open_clip

    captured: list[dict[str, Any]] = []

    def capture(state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> None:
        captured.append(state_dict)

    model.load_state_dict = capture  # an instance attribute shadows the method until deleted
    try:
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    finally:
        del model.load_state_dict
    if len(captured) != 1:
        raise ModelLoadError(f"open_clip did not load CLIP weights {checkpoint} as expected")
    return captured[0]


def _assign_weights(model: Any, state: Mapping[str, Any], device: str) -> None:
    """Put the checkpoint's tensors into an empty model, as the copying load would have.

    ``load_state_dict(assign=True)`` checks keys and shapes exactly like the strict copying load
    (so a checkpoint is accepted or refused as before) but would keep each given tensor as it is.
    So each image-tower tensor is first copied, the way the copying load did it: ``copy_`` into a
    new, uninitialised tensor of the dtype open_clip chose for it at this precision, on
    ``device``. The weights therefore come out bit-identical (same rounding of fp32 to fp16,
    same contiguous layout), and the model owns them: safetensors hands out tensors mapped from
    the file, which would change, or fault, with the file if it were rewritten in place.
    The text tower's tensors are assigned untouched: they are dropped right after
    (`_keep_image_tower`). A tensor of the wrong shape is left for ``load_state_dict`` to refuse.
    """
    torch = _torch()
    expected = model.state_dict()
    weights: dict[str, Any] = {}
    for key, value in state.items():
        want = expected.get(key)
        if (
            key.startswith("visual.")
            and want is not None
            and isinstance(value, torch.Tensor)
            and not value.is_meta  # left empty for the caller to notice (`_meta_tensors`)
            and value.shape == want.shape
        ):
            with torch.no_grad():
                value = torch.empty(want.shape, dtype=want.dtype, device=device).copy_(value)
        weights[key] = value
    model.load_state_dict(weights, strict=True, assign=True)


def _plain_state_dict(state: Any, checkpoint: Path) -> dict[str, Any]:
    """Unwrap a training checkpoint ({'state_dict': ...}, 'module.' prefixes) to a state dict."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"CLIP weights {checkpoint} do not hold a state dict")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state
