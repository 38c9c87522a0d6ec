"""A tiny open_clip model with seeded random weights, saved in open_clip's own local-dir format.

Tests, CI and `rsx demo` need a CLIP embedder but cannot download weights. The toy model is a
real open_clip ``CLIP`` (a 4-block vision transformer on 64 px images and a 2-block text tower),
so it goes through exactly the loader and inference code a full-size checkpoint does.

Load a saved toy model with ``EmbedderSpec(arch="", weights=f"local-dir:{folder}")``: for a
``local-dir:`` folder the architecture comes from the folder's ``open_clip_config.json`` and
``arch`` stays empty.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from resynth_index.models.embedders import EmbedderSpec

TOY_EMBEDDER_LAYER_COUNT = 4

TOY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 64,  # the toy pipelines draw 64 px images: see them at full resolution
        "patch_size": 8,
        "width": 64,
        "layers": TOY_EMBEDDER_LAYER_COUNT,
        "head_width": 16,  # open_clip derives vision heads as width // head_width = 4
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 32,
        "heads": 4,
        "layers": 2,
    },
}

# open_clip's defaults written out, so the saved folder says how its images are preprocessed
TOY_CLIP_PREPROCESS: dict[str, Any] = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

CONFIG_FILENAME = "open_clip_config.json"
WEIGHTS_FILENAME = "open_clip_model.safetensors"
#: Where a lab made with ``--embedder toy`` keeps its toy model, relative to the lab.
LAB_TOY_CLIP_FOLDER = "models/toy-clip"


def build_toy_clip(seed: int = 0) -> torch.nn.Module:
    """An open_clip ``CLIP`` with TOY_CLIP_CONFIG and random weights from ``seed``, in eval mode.

    The global torch random state is left as it was (the seed is applied in a forked RNG).
    """
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**copy.deepcopy(TOY_CLIP_CONFIG))
    size = TOY_CLIP_CONFIG["vision_cfg"]["image_size"]
    preprocess: dict[str, Any] = {"size": (size, size), "mode": "RGB"}
    preprocess.update(copy.deepcopy(TOY_CLIP_PREPROCESS))
    preprocess["fill_color"] = 0
    open_clip.set_model_preprocess_cfg(model, preprocess)
    return model.eval()


def save_toy_clip(folder: Path, seed: int = 0) -> Path:
    """Write the toy model for ``seed`` into ``folder`` in open_clip's local-dir layout.

    The folder gets ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``, the
    layout open_clip's ``local-dir:`` loader and its Hub export use) and the weights as
    ``open_clip_model.safetensors``. Returns ``folder``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_toy_clip(seed)
    config = {
        "model_cfg": copy.deepcopy(TOY_CLIP_CONFIG),
        "preprocess_cfg": copy.deepcopy(TOY_CLIP_PREPROCESS),
    }
    (folder / CONFIG_FILENAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILENAME))
    return folder


def install_toy_clip(lab_root: Path, layer: int | None = None) -> EmbedderSpec:
    """Save the toy model inside a lab (``models/toy-clip``) and return the spec that loads it.

    The spec's folder is relative to the lab, so a lab can be moved whole; the lab resolves it
    against its root when it loads the embedder.
    """
    from resynth_index.models.embedders import EmbedderSpec

    save_toy_clip(Path(lab_root) / LAB_TOY_CLIP_FOLDER)
    return EmbedderSpec(arch="", weights=f"local-dir:{LAB_TOY_CLIP_FOLDER}", layer=layer)
