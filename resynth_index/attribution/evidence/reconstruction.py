"""A reconstruction signal (AEROBLADE-style): how well a generator's own autoencoder redraws images.

A latent diffusion model draws its images through the decoder of its autoencoder, so its images lie
close to what that autoencoder can reproduce: encoding an image and decoding it again through the
generator's own ``AutoencoderKL`` tends to change the generator's own images less than others'
(Ricker et al., AEROBLADE, CVPR 2024). That gives a second, training-free signal per candidate,
independent of captions and resyntheses.

- Only the autoencoder is loaded (``AutoencoderKL.from_pretrained(folder, subfolder="vae",
  local_files_only=True)``, float32), never the whole pipeline; a generator whose pipeline is
  already loaded in float32 lends its autoencoder instead (the same weights, the same numbers).
- Encode with the posterior's mode (no sampling: deterministic), decode, clamp to [0, 1].
- The distance needs no downloaded weights: AEROBLADE's LPIPS needs a pretrained VGG that cannot be
  fetched here. ``embedder`` (the default) is the cosine distance between the lab's embedding of
  the image and of its reconstruction (1 - E(x)·E(VAE(x))); ``pixel-l1`` the mean absolute
  difference over pixels and channels on [0, 1]; ``pixel-l2`` the root mean square. The default
  is the one that worked where it could be measured: on the toy zoo each toy's own autoencoder
  changes its images least under ``embedder`` (every image tested), while pixel distances are
  dominated by how much each autoencoder blurs any image (random toy encoders do not invert their
  decoders), so they rank autoencoders rather than sources. On trained autoencoders, where the
  encoder inverts the decoder, pixel distances are the ones AEROBLADE found to work.
- The image is used at its own resolution, cropped (centred) to a multiple of the autoencoder's
  downsampling factor and to at most ``max_side`` pixels a side: resizing would smear the traces.
- Imported generators, single-file checkpoints and pipelines without an ``AutoencoderKL`` are
  ``unsupported`` (with the reason): no autoencoder is guessed.
- Distances are cached in memory per (image SHA-256, reconstruction fingerprint), the fingerprint
  covering the generator's weights and settings, the metric, the crop limit and this method's
  version.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from resynth_index.errors import ModelLoadError, RsxError
from resynth_index.models.fingerprints import combine

if TYPE_CHECKING:
    import PIL.Image

    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import Generator
    from resynth_index.store.models import GeneratorRow

RECONSTRUCTION_VERSION = "rsx-vae-reconstruction-v1"
METRICS = ("pixel-l1", "pixel-l2", "embedder")
DEFAULT_METRIC = "embedder"
#: The largest side reconstructed; a bigger image is centre-cropped (never resized) to it.
DEFAULT_MAX_SIDE = 1024
UNSUPPORTED_IMPORTED = "imported generator: the lab has no autoencoder of it"

#: (n, d) L2-normalised embeddings of images (the lab's embedder), for the ``embedder`` metric.
EmbedFunction = Callable[[Sequence["PIL.Image.Image"]], np.ndarray]


def autoencoder_folder(generator: Generator) -> tuple[Path | None, str]:
    """The pipeline folder whose ``vae/`` holds the generator's AutoencoderKL, or why there is none.

    Returns ``(folder, "")`` when supported, ``(None, reason)`` otherwise. Reads only
    ``model_index.json``; nothing is loaded.
    """
    if not getattr(generator, "can_generate", False):
        return None, UNSUPPORTED_IMPORTED
    path = getattr(generator, "path", None)
    if path is None:
        return None, "no model files known for this generator"
    path = Path(path)
    if not path.is_dir():
        return None, "single-file checkpoint: no separate autoencoder folder to load"
    try:
        index = json.loads((path / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None, "model_index.json is unreadable"
    entry = index.get("vae") if isinstance(index, dict) else None
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] != "AutoencoderKL":
        return None, "the pipeline has no AutoencoderKL 'vae' component"
    if not (path / "vae").is_dir():
        return None, "the pipeline folder has no vae/ folder"
    return path, ""


def reconstruction_fingerprint(
    generator_fingerprint: str, metric: str, max_side: int, embedder: str | None = None
) -> str:
    """What a reconstruction distance depends on: the generator (its files and settings), the
    metric (and the embedder behind the ``embedder`` metric), the crop limit and this code."""
    return combine(
        RECONSTRUCTION_VERSION, generator_fingerprint, metric, str(max_side), embedder or ""
    )


def _check_metric(metric: str, embed: EmbedFunction | None) -> None:
    if metric not in METRICS:
        raise RsxError(f"unknown reconstruction metric {metric!r}: use {', '.join(METRICS)}")
    if metric == "embedder" and embed is None:
        raise RsxError("the 'embedder' reconstruction metric needs the lab's embedder")


def crop_box(width: int, height: int, factor: int, max_side: int) -> tuple[int, int, int, int]:
    """The centred crop (left, top, right, bottom) an image is reconstructed on: each side a
    multiple of ``factor`` and at most ``max_side`` (rounded down to the factor). Empty when the
    image is smaller than ``factor``."""
    limit = max(factor, max_side - max_side % factor)
    new_w = min(width - width % factor, limit)
    new_h = min(height - height % factor, limit)
    left = (width - new_w) // 2
    top = (height - new_h) // 2
    return left, top, left + new_w, top + new_h


def pixel_distance(original: np.ndarray, reconstruction: np.ndarray, metric: str) -> float:
    """Distance between two (H, W, 3) float arrays on [0, 1]: mean absolute or root mean square."""
    diff = original.astype(np.float64) - reconstruction.astype(np.float64)
    if metric == "pixel-l1":
        return float(np.abs(diff).mean())
    if metric == "pixel-l2":
        return float(np.sqrt(np.mean(diff * diff)))
    raise ValueError(f"not a pixel metric: {metric!r}")


class VaeReconstructor:
    """Encode and decode images through one generator's own AutoencoderKL (float32).

    ``vae``: an AutoencoderKL already in memory with the same weights (the loaded pipeline's);
    otherwise it is loaded from ``folder/vae`` on first use, with ``local_files_only``.
    """

    def __init__(self, folder: Path, device: str = "auto", vae: Any = None) -> None:
        self.folder = Path(folder)
        self.device_choice = device
        self._vae = vae

    def load(self) -> Any:
        """The autoencoder, in eval mode, float32, on its device (loaded once)."""
        if self._vae is not None:
            return self._vae
        import importlib.util

        import torch
        from diffusers import AutoencoderKL

        from resynth_index.models.devices import resolve_device

        device = resolve_device(self.device_choice)
        try:
            vae = AutoencoderKL.from_pretrained(
                str(self.folder),
                subfolder="vae",
                local_files_only=True,
                torch_dtype=torch.float32,
                # as the generators load: without accelerate diffusers warns, then falls back
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
            )
        except Exception as error:  # diffusers raises OSError/ValueError/EnvironmentError alike
            text = " ".join(str(error).split())[:200]
            raise ModelLoadError(
                f"{self.folder}/vae: cannot load the autoencoder: {text}"
            ) from error
        self._vae = vae.to(device).eval()
        return self._vae

    @property
    def factor(self) -> int:
        """How much the encoder shrinks each side (2 ** (levels - 1))."""
        return 2 ** (len(self.load().config.block_out_channels) - 1)

    def reconstruct(self, pixels: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) float32 on [0, 1] -> the same shape, after encode (posterior mode) and
        decode; H and W must be multiples of ``factor``."""
        import torch

        vae = self.load()
        param = next(vae.parameters())
        batch = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
        batch = batch.to(device=param.device, dtype=param.dtype) * 2.0 - 1.0
        with torch.inference_mode():
            latents = vae.encode(batch).latent_dist.mode()
            decoded = vae.decode(latents).sample
        out = (decoded.float() / 2.0 + 0.5).clamp(0.0, 1.0)
        return out.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32, copy=False)


@dataclass
class ReconstructionScorer:
    """Reconstruction distances of images through each candidate's autoencoder, cached in memory.

    One scorer lives for one evaluation run or one query call: ``distances`` computes what the
    cache lacks, batching images of the same size, and remembers every value per (image SHA-256,
    reconstruction fingerprint). ``unsupported`` names the candidates without an autoencoder and
    why. ``device`` "auto" follows each generator's own device setting.
    """

    metric: str = DEFAULT_METRIC
    embed: EmbedFunction | None = None
    embedder_fingerprint: str | None = None
    max_side: int = DEFAULT_MAX_SIDE
    batch_size: int = 8
    device: str = "auto"
    cache: dict[tuple[str, str], float] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    computed: int = 0  # reconstructions made (cache misses), for cost reports and tests
    _reconstructors: dict[str, VaeReconstructor | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_metric(self.metric, self.embed)
        if self.max_side < 8:
            raise RsxError("the reconstruction crop limit must be at least 8 pixels")

    def fingerprint(self, generator: Generator) -> str:
        return reconstruction_fingerprint(
            generator.fingerprint, self.metric, self.max_side, self.embedder_fingerprint
        )

    def reconstructor(self, generator: Generator) -> VaeReconstructor | None:
        """The generator's reconstructor, or None (the reason goes to ``unsupported``)."""
        if generator.name not in self._reconstructors:
            folder, reason = autoencoder_folder(generator)
            if folder is None:
                self.unsupported[generator.name] = reason
                self._reconstructors[generator.name] = None
            else:
                device = self.device
                if device == "auto":
                    device = generator.settings.device
                self._reconstructors[generator.name] = VaeReconstructor(
                    folder, device, vae=_loaded_float32_vae(generator)
                )
        return self._reconstructors[generator.name]

    def supports(self, generator: Generator) -> bool:
        return self.reconstructor(generator) is not None

    def distances(
        self,
        generators: Sequence[Generator],
        images: Sequence[tuple[str, PIL.Image.Image]],
    ) -> np.ndarray:
        """(n images, n generators) distances; NaN where the generator is unsupported or the image
        is smaller than its autoencoder's downsampling factor. ``images``: (SHA-256, picture)."""
        out = np.full((len(images), len(generators)), np.nan)
        for column, generator in enumerate(generators):
            reconstructor = self.reconstructor(generator)
            if reconstructor is None:
                continue
            fingerprint = self.fingerprint(generator)
            todo = [
                row
                for row, (sha, _picture) in enumerate(images)
                if (sha, fingerprint) not in self.cache
            ]
            if todo:
                self._compute(reconstructor, fingerprint, [images[row] for row in todo])
            for row, (sha, _picture) in enumerate(images):
                out[row, column] = self.cache.get((sha, fingerprint), np.nan)
        return out

    def _compute(
        self,
        reconstructor: VaeReconstructor,
        fingerprint: str,
        images: Sequence[tuple[str, PIL.Image.Image]],
    ) -> None:
        factor = reconstructor.factor
        groups: dict[tuple[int, int], list[tuple[str, np.ndarray, PIL.Image.Image]]] = {}
        for sha, picture in dict(images).items():  # one reconstruction per distinct image
            rgb = picture if picture.mode == "RGB" else picture.convert("RGB")
            box = crop_box(rgb.width, rgb.height, factor, self.max_side)
            if box[2] <= box[0] or box[3] <= box[1]:
                self.cache[(sha, fingerprint)] = float("nan")  # too small to encode
                continue
            cropped = rgb.crop(box)
            array = np.asarray(cropped, dtype=np.float32) / 255.0
            groups.setdefault(array.shape[:2], []).append((sha, array, cropped))
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                originals = np.stack([array for _sha, array, _cropped in chunk])
                rebuilt = reconstructor.reconstruct(originals)
                self.computed += len(chunk)
                values = self._measure(chunk, originals, rebuilt)
                for (sha, _array, _cropped), value in zip(chunk, values, strict=True):
                    self.cache[(sha, fingerprint)] = value

    def _measure(self, chunk: list, originals: np.ndarray, rebuilt: np.ndarray) -> list[float]:
        if self.metric != "embedder":
            return [
                pixel_distance(o, r, self.metric) for o, r in zip(originals, rebuilt, strict=True)
            ]
        from PIL import Image

        assert self.embed is not None
        pictures = [cropped for _sha, _array, cropped in chunk]
        pictures += [Image.fromarray(np.round(r * 255.0).astype(np.uint8)) for r in rebuilt]
        vectors = self.embed(pictures)
        n = len(chunk)
        similarity = np.sum(vectors[:n].astype(np.float64) * vectors[n:], axis=1)
        return [float(1.0 - s) for s in similarity]


def _loaded_float32_vae(generator: Generator) -> Any:
    """The autoencoder of the generator's pipeline when it is already loaded in float32, else
    None (an fp16 pipeline's autoencoder would give other numbers than the float32 load)."""
    if not getattr(generator, "loaded", False):
        return None
    vae = getattr(getattr(generator, "pipeline", None), "vae", None)
    if vae is None:
        return None
    import torch

    return vae if next(vae.parameters()).dtype == torch.float32 else None


def query_reconstruction(
    lab: Lab,
    generators: Sequence[GeneratorRow],
    images: Sequence[tuple[str, PIL.Image.Image]],
    scorer: ReconstructionScorer,
) -> dict[str, dict[str, float | None]]:
    """image SHA-256 -> candidate -> reconstruction distance (None: unsupported or too small).

    Generators are taken from the lab (``lab.generator_model``), so a pipeline loaded for
    generation lends its autoencoder; only the autoencoder of the others is loaded.
    """
    models = [lab.generator_model(row) for row in generators]
    values = scorer.distances(models, images)
    return {
        sha: {
            row.name: (None if not np.isfinite(values[i, k]) else float(values[i, k]))
            for k, row in enumerate(generators)
        }
        for i, (sha, _picture) in enumerate(images)
    }


#: Reconstruction scorers kept per open lab, so a long-lived process (``rsx serve``) loads each
#: autoencoder once and never reconstructs the same image twice. A scorer must not hold its lab
#: (``_weak_embed``): a value that refers to its key keeps the entry, and the lab, forever.
_SCORERS: weakref.WeakKeyDictionary[Any, ReconstructionScorer] = weakref.WeakKeyDictionary()


def scorer_for(lab: Lab) -> ReconstructionScorer:
    """The lab's reconstruction scorer (default metric, the lab's embedder), made once per lab."""

    scorer = _SCORERS.get(lab)
    if scorer is None:
        embed = _weak_embed(lab) if DEFAULT_METRIC == "embedder" else None
        scorer = ReconstructionScorer(
            metric=DEFAULT_METRIC,
            embed=embed,
            embedder_fingerprint=lab.fingerprint if embed is not None else None,
            device=lab.device,
        )
        _SCORERS[lab] = scorer
    return scorer


def _weak_embed(lab: Lab) -> Callable[[Sequence[PIL.Image.Image]], np.ndarray]:
    """The lab's embedder as a function that holds the lab weakly, so the scorer kept for the
    lab in ``_SCORERS`` lets it be freed once closed and dropped (the entry goes with it)."""
    held = weakref.ref(lab)

    def embed(images: Sequence[PIL.Image.Image]) -> np.ndarray:
        owner = held()
        if owner is None:  # only a scorer taken out of _SCORERS can outlive its lab
            raise RsxError("the lab of this reconstruction scorer is gone: open it again")
        return owner.embedder.embed(images)

    return embed
