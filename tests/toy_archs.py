"""Tiny open_clip architectures registered under test names, for the checkpoint-file route."""

from __future__ import annotations

import json
from pathlib import Path

from resynth_index.models.toyzoo.clip import TOY_CLIP_CONFIG


def register_toy_archs(folder: Path, vit: str, resnet: str) -> None:
    """Register the toy ViT as ``vit`` and a tiny ResNet (BatchNorm buffers) as ``resnet``."""
    import open_clip

    (folder / f"{vit}.json").write_text(json.dumps(TOY_CLIP_CONFIG))
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": TOY_CLIP_CONFIG["text_cfg"],
    }
    (folder / f"{resnet}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
