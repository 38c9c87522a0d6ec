"""A tiny BLIP image-to-text model with seeded random weights and an offline word-level tokenizer.

Tests, CI and `rsx demo` need a captioning model but cannot download one. The toy captioner is a
real transformers ``BlipForConditionalGeneration`` (a 2-layer vision transformer on 32 px images and
a 2-layer text decoder of width 32) with a ``BlipProcessor`` whose ``BertTokenizer`` is built from a
few hundred plain English words. Saved with ``save_pretrained`` it loads back through the regular
auto classes, so ``TransformersCaptioner`` runs the same code path as for a real BLIP checkpoint.
Its captions are nonsense, but deterministic for a given seed and image.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import BlipForConditionalGeneration, BlipProcessor

TOY_CAPTIONER_IMAGE_SIZE = 32
_IMAGE_PATH_STD = 0.2
_IMAGE_PATH_SEED_OFFSET = 7919

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Plain lowercase words, so every caption the toy model writes is a readable (if odd) phrase.
_WORDS = """
a an the of in on at with and near under over behind beside above below through from by
photo picture painting drawing sketch render illustration portrait landscape closeup view scene
cat dog bird horse cow sheep fish rabbit fox wolf bear lion tiger deer owl duck frog mouse
man woman child boy girl person people crowd family friend farmer sailor doctor chef artist
tree forest flower garden grass field meadow mountain hill valley river lake sea ocean beach
sky cloud sun moon star rain snow storm fog wind light shadow night morning evening sunset
house castle tower bridge road street city village town building church window door roof wall
car bus train boat ship bicycle plane truck cart wagon
table chair bed lamp clock book cup bowl plate bottle vase basket box bag hat coat dress shoe
red orange yellow green blue purple pink brown black white grey gold silver dark bright pale
big small tall short old young new ancient modern tiny huge quiet busy empty full warm cold
happy sad calm wild soft sharp smooth rough wet dry shiny dusty broken golden wooden stone
standing sitting running walking flying swimming sleeping eating reading playing looking waiting
two three four many several some one pair group row
style oil watercolor digital pencil ink cartoon anime realistic detailed simple vintage cinematic
""".split()


def _vocabulary() -> list[str]:
    seen: dict[str, None] = {}
    for word in (*_SPECIAL_TOKENS, *_WORDS):
        seen.setdefault(word, None)
    return list(seen)


def _build_processor() -> BlipProcessor:
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor

    with tempfile.TemporaryDirectory(prefix="rsx-toy-vocab-") as folder:
        vocab_file = Path(folder) / "vocab.txt"
        vocab_file.write_text("\n".join(_vocabulary()) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True)
    image_processor = BlipImageProcessor(
        size={"height": TOY_CAPTIONER_IMAGE_SIZE, "width": TOY_CAPTIONER_IMAGE_SIZE}
    )
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_toy_captioner(seed: int = 0) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """A tiny BLIP captioner (model in eval mode, processor) with random weights from ``seed``.

    The global torch random state is left as it was (the seed is applied in a forked RNG).
    """
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    processor = _build_processor()
    vocab = _vocabulary()
    special = {token: vocab.index(token) for token in _SPECIAL_TOKENS}
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TOY_CAPTIONER_IMAGE_SIZE,
            "patch_size": 8,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "bos_token_id": special["[CLS]"],
            "sep_token_id": special["[SEP]"],
            "eos_token_id": special["[SEP]"],
            "pad_token_id": special["[PAD]"],
        },
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    _amplify_image_path(model, seed)
    model.eval()
    # A random decoder likes special tokens; forbid them (except the end marker, after a few words)
    # so toy captions are never empty.
    generation = model.generation_config
    generation.suppress_tokens = [special[token] for token in ("[PAD]", "[UNK]", "[CLS]", "[MASK]")]
    generation.min_new_tokens = 3
    generation.max_new_tokens = 12
    generation.do_sample = False
    generation.num_beams = 1
    return model, processor


def _amplify_image_path(model: BlipForConditionalGeneration, seed: int) -> None:
    """Redraw the vision tower's and the cross-attention's matrices with a larger spread.

    With the standard initialisation (std 0.02) the random decoder ignores the image and writes the
    same words for every picture; stronger image features make different images get different
    captions, as with a real captioner.
    """
    import torch

    generator = torch.Generator().manual_seed(seed + _IMAGE_PATH_SEED_OFFSET)
    with torch.no_grad():
        for name, tensor in sorted(model.named_parameters()):
            if tensor.dim() >= 2 and ("vision_model" in name or "crossattention" in name):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * _IMAGE_PATH_STD)


def save_toy_captioner(folder: Path, seed: int = 0) -> Path:
    """Build the toy captioner for ``seed`` and save model and processor into ``folder``."""
    from resynth_index.models.toyzoo.quiet import no_progress_bars

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, processor = build_toy_captioner(seed)
    with no_progress_bars():  # no "Writing model shards" bar for a model this small
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder
