"""How many images a generator makes per batch when the lab's setting is "auto".

``default_batch_size`` is a pure function of the device type, the images' size, the pipeline
class and the free device memory, so it is tested without a GPU. ``generator_batch_size`` gathers
those facts for a generator about to run (on CUDA it loads the pipeline first, so the free memory
it reads is what the weights leave) and gives its batch; ``resolve_batch_size`` lets an explicit
number (``--batch-size``, ``rsx config set generation_batch_size N``) win over "auto".

The choices:

- CPU (and Apple MPS): ``CPU_BATCH`` (4). On a CPU a batch saves the per-call overhead (the text
  encoder, the scheduler, Python) but not the convolutions, so the gain flattens fast: the toy zoo
  measured 1.37x for batch 4 over batch 1 on 2 cores (README, Performance). Activations grow with
  the batch, in float32 on a CPU: an SD1.5 batch of 4 at 512 px holds a few GB, which a laptop has;
  16 would not be faster and could swap. A batch is also the unit of progress and of what Ctrl-C
  keeps, and 4 SD1.5 images on a CPU already take minutes.
- CUDA: ``CUDA_BATCH_AT_512`` (16) for an SD1.5-class pipeline at 512 x 512, scaled by pixel count
  for other sizes (SDXL-class at 1024 x 1024 gets 4, the batch ``scripts/gpu_bench.py`` measures),
  at most ``MAX_CUDA_BATCH``, then capped so that the estimated activation memory of the batch
  fits in ``MEMORY_FRACTION`` of the free device memory (``torch.cuda.mem_get_info``).

Never below 1: a generator too big for the memory left still gets a batch of one (and fails, if
it must, the way it would have at any batch size).
"""

from __future__ import annotations

import math
from typing import Any

#: The setting's value meaning "choose for the device" (``LabSettings.generation_batch_size``).
AUTO = "auto"

#: Images per batch on a CPU (and on Apple MPS, whose memory the device cannot report).
CPU_BATCH = 4
#: Images per batch on CUDA for an SD1.5-class pipeline at 512 x 512 (before the memory cap).
CUDA_BATCH_AT_512 = 16
#: The image size ``CUDA_BATCH_AT_512`` is for, in pixels; other sizes scale by pixel count.
REFERENCE_PIXELS = 512 * 512
#: The largest batch chosen on CUDA (tiny images would otherwise scale to hundreds per batch,
#: with nothing gained and a bigger loss at Ctrl-C).
MAX_CUDA_BATCH = 64
#: The share of the free device memory (read after the pipeline's weights are loaded) the batch's
#: activations may take; the rest is slack for the allocator's fragmentation and other processes.
MEMORY_FRACTION = 0.8

_GIB = 1024**3
#: ESTIMATED peak activation memory per image in float16, per megapixel of output, by pipeline
#: family. An estimate, NOT a measurement: no GPU was available when it was written. Reasoning:
#: diffusers with PyTorch's scaled-dot-product attention keeps the UNet's activations small (with
#: classifier-free guidance the UNet runs two samples per image); the peak is the VAE decoder at
#: full resolution (128-512 channels at up to 512 x 512 per SD1.5 image, several tensors alive at
#: once, GroupNorm upcasts). Published reports put SD1.5 fp16 at about 0.5-0.8 GiB per image at
#: 512 px beyond its weights; 3 GiB per megapixel is 0.75 GiB at 512 px. SDXL's UNet is wider
#: (transformer depth 10 at its lowest level) and its VAE decodes 1024 px: 3.5 GiB per megapixel,
#: 3.5 GiB per image at 1024 px. Measure on a GPU (scripts/gpu_bench.py) and correct these.
ACTIVATION_BYTES_PER_MEGAPIXEL = {
    "sd": 3.0 * _GIB,  # SD1.x / SD2.x-class (StableDiffusionPipeline and the like)
    "sdxl": 3.5 * _GIB,  # SDXL-class (StableDiffusionXLPipeline and the like)
}
#: Bytes per value relative to float16, for the activation estimate.
_DTYPE_SCALE = {"float16": 1.0, "bfloat16": 1.0, "float32": 2.0}


def pipeline_family(pipeline_class: str | None) -> str:
    """``"sdxl"`` for an SDXL-class pipeline class name, else ``"sd"`` (SD1.5-class)."""
    return "sdxl" if pipeline_class and "XL" in pipeline_class else "sd"


def activation_bytes_per_image(
    width: int, height: int, pipeline_class: str | None = None, dtype: str = "float16"
) -> float:
    """The ESTIMATED activation memory one image of ``width`` x ``height`` needs (see
    ``ACTIVATION_BYTES_PER_MEGAPIXEL``)."""
    per_megapixel = ACTIVATION_BYTES_PER_MEGAPIXEL[pipeline_family(pipeline_class)]
    return per_megapixel * (width * height / 1e6) * _DTYPE_SCALE.get(dtype, 2.0)


def default_batch_size(
    device_type: str,
    width: int = 512,
    height: int = 512,
    *,
    free_bytes: int | None = None,
    pipeline_class: str | None = None,
    dtype: str = "float16",
) -> int:
    """The batch "auto" means for a generator of ``width`` x ``height`` images on
    ``device_type`` ("cpu", "mps", "cuda" or "cuda:N").

    On CUDA ``free_bytes`` is the free device memory once the pipeline is loaded (None: unknown,
    no cap); ``pipeline_class`` (e.g. "StableDiffusionXLPipeline") and ``dtype`` refine the
    memory estimate. Always at least 1.
    """
    if not device_type.startswith("cuda"):
        return CPU_BATCH
    pixels = max(1, width * height)
    batch = min(MAX_CUDA_BATCH, math.floor(CUDA_BATCH_AT_512 * REFERENCE_PIXELS / pixels))
    if free_bytes is not None:
        per_image = activation_bytes_per_image(width, height, pipeline_class, dtype)
        batch = min(batch, math.floor(MEMORY_FRACTION * max(0, free_bytes) / per_image))
    return max(1, batch)


def is_auto(setting: Any) -> bool:
    """Whether a batch-size setting means "choose for the device" ("auto" or None)."""
    return setting is None or setting == AUTO


def generator_batch_size(model: Any) -> int:
    """The "auto" batch for ``model`` (a runnable generator) where it will run.

    Reads the device and image size from its settings. On CUDA the pipeline is loaded first (it
    would be for the first batch anyway) so the free memory read is what its weights leave.
    """
    from resynth_index.models.generators.protocol import concrete_dtype

    settings = model.settings
    device = generator_device(model)
    free: int | None = None
    pipeline_class: str | None = None
    if device.startswith("cuda"):
        import torch

        load = getattr(model, "load", None)
        if callable(load):
            pipeline_class = type(load()).__name__
        free = int(torch.cuda.mem_get_info(torch.device(device))[0])
    return default_batch_size(
        device,
        settings.width,
        settings.height,
        free_bytes=free,
        pipeline_class=pipeline_class,
        dtype=concrete_dtype(settings.dtype, device),
    )


def generator_device(model: Any) -> str:
    """The concrete device ``model`` (a runnable generator) runs on, from its settings."""
    from resynth_index.models.devices import resolve_device

    return resolve_device(model.settings.device)


def resolve_batch_size(setting: Any, model: Any) -> int:
    """``setting`` when it is a number (an explicit choice wins), else ``model``'s "auto" batch."""
    if is_auto(setting):
        return generator_batch_size(model)
    return int(setting)
