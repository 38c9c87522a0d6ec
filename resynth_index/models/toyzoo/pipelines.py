"""Tiny Stable Diffusion pipelines with seeded random weights: the toy zoo's generators.

Each is a genuine ``diffusers.StableDiffusionPipeline`` (UNet, 2-level VAE, 2-layer CLIP text
encoder, the real CLIP tokenizer, DDIM) small enough to make a 64 px image in a fraction of a second
on a CPU. Different seeds give different weights, hence systematically different images; a
"family member" (``base_seed`` + a small ``perturbation``) is a slightly nudged copy of its base,
standing in for a fine-tune of a known model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from resynth_index.models.generators.protocol import GenerationSettings

if TYPE_CHECKING:
    import diffusers

#: Settings the toy pipelines are run with: 64 px, few steps, mild guidance (fast on a CPU).
TOY_SETTINGS = GenerationSettings(steps=4, guidance=3.0, width=64, height=64)

_CROSS_ATTENTION_DIM = 32

#: Stable Diffusion 1.x's DDIM scheduler (the toy pipelines and the GPU benchmark's SD1.5/SDXL).
DDIM_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def ddim_scheduler() -> diffusers.DDIMScheduler:
    """A fresh DDIM scheduler with ``DDIM_SCHEDULER_CONFIG``."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**DDIM_SCHEDULER_CONFIG)


def _seeded_components(seed: int) -> dict:
    """UNet, VAE and text encoder with weights drawn from ``torch.manual_seed(seed)``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,  # the 2-level VAE halves the size: 64 px images, 32 px latents
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_CROSS_ATTENTION_DIM,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=_CROSS_ATTENTION_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=_CROSS_ATTENTION_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    text_encoder = CLIPTextModel(text_config)
    return {"text_encoder": text_encoder, "unet": unet, "vae": vae}


#: A perturbation: one relative scale for every component, or a scale per component name
#: (``"unet"``, ``"vae"``, ``"text_encoder"``; a component not named is left as it is).
Perturbation = float | Mapping[str, float]


def _scales(components: dict, perturbation: Perturbation) -> dict[str, float]:
    """The relative noise scale of each component; unknown component names are refused."""
    if not isinstance(perturbation, Mapping):
        return dict.fromkeys(components, float(perturbation))
    unknown = sorted(set(perturbation) - set(components))
    if unknown:
        raise ValueError(
            f"unknown toy component(s) {', '.join(unknown)}: use {', '.join(sorted(components))}"
        )
    return {key: float(perturbation.get(key, 0.0)) for key in components}


def _perturb(components: dict, seed: int, perturbation: Perturbation) -> None:
    """Add ``scale * N(0, 1) * std(tensor)`` to every floating parameter (noise from seed).

    ``scale`` is ``perturbation``, or its entry for the component when it is a mapping.
    Components and tensor names are visited in sorted order so the result depends on the seed only;
    the noise is drawn for every tensor whatever its scale, so a component's draw does not depend
    on the other components' scales (a mapping of equal scales equals that one float).
    Constant tensors (std 0, e.g. fresh norm weights) are left as they are.
    """
    import torch

    scales = _scales(components, perturbation)
    noise = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for key in sorted(components):
            scale = scales[key]
            params = dict(components[key].named_parameters())
            for name in sorted(params):
                tensor = params[name]
                if not tensor.is_floating_point() or tensor.numel() < 2:
                    continue
                std = tensor.std()
                if float(std) == 0.0:
                    continue
                draw = torch.randn(tensor.shape, generator=noise, dtype=tensor.dtype)
                if scale:
                    tensor.add_(draw * (scale * std))


def build_toy_pipeline(
    seed: int, base_seed: int | None = None, perturbation: Perturbation = 0.0
) -> diffusers.StableDiffusionPipeline:
    """A tiny StableDiffusionPipeline on the CPU in float32.

    Without ``base_seed`` the weights come from ``seed``. With it, the weights come from
    ``base_seed`` and are then nudged by ``perturbation`` (relative to each tensor's spread; one
    float for all components or a mapping per component, see ``Perturbation``) with noise drawn
    from ``seed``: a family member of the ``base_seed`` pipeline.
    """
    from diffusers import StableDiffusionPipeline

    from resynth_index.models.toyzoo.tokenizer import clip_tokenizer

    components = _seeded_components(seed if base_seed is None else base_seed)
    if base_seed is not None and perturbation:
        _perturb(components, seed, perturbation)
    pipe = StableDiffusionPipeline(
        **components,
        tokenizer=clip_tokenizer(),
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in components.values():
        module.eval()
    return pipe


def save_toy_pipeline(folder: Path, seed: int, **kw) -> Path:
    """Build a toy pipeline (see ``build_toy_pipeline`` for ``kw``) and save it as safetensors."""
    from resynth_index.models.toyzoo.quiet import no_progress_bars

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = build_toy_pipeline(seed, **kw)
    with no_progress_bars():  # no "Writing model shards" bar for a model this small
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def ensure_toy_pipeline(
    folder: Path, seed: int, *, base_seed: int | None = None, perturbation: Perturbation = 0.0
) -> Path:
    """The toy pipeline saved in ``folder``, built there first unless a pipeline is there already
    (so registering it again, or in a copied lab, never rebuilds it). Returns ``folder``."""
    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        save_toy_pipeline(folder, seed, base_seed=base_seed, perturbation=perturbation)
    return folder
