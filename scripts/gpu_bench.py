"""The benchmark rows of ``scripts/bench.py`` at real sizes, for one GPU (random weights, fp16).

Rows:
  generation  SD1.5 (512 px, 25 steps, guidance 7.5) batch 16 vs one at a time, and SDXL
              (1024 px, 25 steps) batch 4 vs one at a time: UNet, VAE and CLIP text encoders built
              from the published configs (written out below) with random weights, fp16
  ingest      ViT-L/14 at 336 px (random weights, fp16) ingest vs bare forward, batch 64
  query       warm query vs one embedding forward, on a lab holding 1,000,000 stored vectors
  startup     `rsx --help`
  CLI rows    `rsx resynthesize` (the SD1.5 pipeline saved to a folder and registered, batch 16),
              `rsx ingest` and `rsx query` (ViT-L/14-336) as users run them, each in a fresh
              process at two work sizes: per image against the bare operation at the same batch,
              and the one-off cost per command as its own row (scripts/bench_cli.py)

Designed to finish in under 8 minutes on one H100 without the CLI rows (``--skip cli``); the
CLI rows start six fresh rsx processes, each loading its models, and add an estimated 3-5
minutes (not measured: no GPU was available when they were written). Nothing is downloaded:
the tokenizer is the toy zoo's CLIP tokenizer, every weight is drawn at random on the device.

  .venv/bin/python scripts/gpu_bench.py           # real sizes, needs CUDA
  .venv/bin/python scripts/gpu_bench.py --tiny    # toy sizes on whatever device (logic check)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bench  # noqa: E402
from bench_cli import cli_rows  # noqa: E402

# ------------------------------------------------------------------------- published configs
# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, unet/vae/text_encoder config.json)
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
CLIP_L_TEXT = {  # openai/clip-vit-large-patch14 text tower (SD1.5, SDXL text_encoder)
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0)
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
CLIP_BIGG_TEXT = {  # laion CLIP ViT-bigG/14 text tower (SDXL text_encoder_2, with projection)
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
TOKENS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}

# ------------------------------------------------------------------------- tiny stand-ins (--tiny)
TINY_UNET = {
    "sample_size": 32,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 32,
}
TINY_VAE = {
    **SD_VAE,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "sample_size": 64,
}
TINY_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}

ARCHS = {
    # name: (size, steps, guidance, images, batch)
    "sd15": (512, 25, 7.5, 16, 16),
    "sdxl": (1024, 25, 5.0, 4, 4),
}


def build_pipeline(arch: str, device: str, tiny: bool):
    """SD1.5 or SDXL pipeline with random weights drawn on ``device`` (fp16 on CUDA)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from resynth_index.models.toyzoo.pipelines import ddim_scheduler
    from resynth_index.models.toyzoo.tokenizer import clip_tokenizer

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        if arch == "sd15":
            unet_cfg = {**TINY_UNET, "cross_attention_dim": 32} if tiny else SD15_UNET
            text_cfg = TINY_TEXT if tiny else CLIP_L_TEXT
            parts = {
                "unet": UNet2DConditionModel(**unet_cfg),
                "vae": AutoencoderKL(**(TINY_VAE if tiny else SD_VAE)),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**text_cfg, **TOKENS)),
            }
        else:
            text_1 = TINY_TEXT if tiny else CLIP_L_TEXT
            text_2 = TINY_TEXT if tiny else CLIP_BIGG_TEXT
            if tiny:
                unet_cfg = {
                    **TINY_UNET,
                    "cross_attention_dim": text_1["hidden_size"] + text_2["hidden_size"],
                    "use_linear_projection": True,
                    "addition_embed_type": "text_time",
                    "addition_time_embed_dim": 8,
                    "projection_class_embeddings_input_dim": 8 * 6 + text_2["projection_dim"],
                }
            else:
                unet_cfg = SDXL_UNET
            parts = {
                "unet": UNet2DConditionModel(**unet_cfg),
                "vae": AutoencoderKL(**(TINY_VAE if tiny else SDXL_VAE)),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**text_1, **TOKENS)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**text_2, **TOKENS)),
            }
    for module in parts.values():
        module.to(dtype=dtype).eval()
    tokenizer = clip_tokenizer()
    if arch == "sd15":
        pipe = StableDiffusionPipeline(
            **parts,
            tokenizer=tokenizer,
            scheduler=ddim_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            **parts, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=ddim_scheduler()
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_generation_arch(arch: str, n: int | None = None, batch: int | None = None, *, tiny: bool):
    """Batched vs one-at-a-time generation of the same ``n`` images (one Row)."""
    import torch

    from resynth_index.models.generators.diffusers import generate_images
    from resynth_index.models.generators.protocol import GenerationRequest, GenerationSettings

    size, steps, guidance, default_n, default_batch = ARCHS[arch]
    n = n or default_n
    batch = batch or default_batch
    if tiny:
        size, steps, n, batch = 64, 4, 4, 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    pipe = build_pipeline(arch, device, tiny)
    built = time.perf_counter() - start
    settings = GenerationSettings(steps=steps, guidance=guidance, width=size, height=size)
    requests = [GenerationRequest(f"a photograph, subject {i % 4}", i) for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights may decode to NaN pixels
        generate_images(pipe, requests[:2], settings, batch_size=2)  # warm-up (kernels, cache)
        one = bench.timed(lambda: generate_images(pipe, requests, settings, batch_size=1))
        many = bench.timed(lambda: generate_images(pipe, requests, settings, batch_size=batch))
    pipe = None  # let the weights go before the next row
    if device == "cuda":
        torch.cuda.empty_cache()
    ratio = one / many
    target = 4.0 if arch == "sd15" and not tiny else 1.0
    label = "tiny " if tiny else ""
    return bench.Row(
        f"generation {label}{arch} {size}px {steps} steps, batch {batch} vs 1 ({n} images, "
        f"{device}; built in {built:.0f} s)",
        f"{n / many:.2f} img/s",
        f"{n / one:.2f} img/s",
        ratio,
        f">= {target:g}x",
        ratio >= target,
    )


def saved_generator(arch: str, device: str, tiny: bool, scratch: Path):
    """``add_generator`` for ``bench_cli.cli_rows``: the pipeline of ``build_pipeline`` saved as
    a diffusers folder and registered in the lab (K = 1), as a user registers a real one."""
    from resynth_index.models.generators.protocol import GenerationSettings

    def add(lab):
        size, steps, guidance, _n, _batch = ARCHS[arch]
        if tiny:
            size, steps = 64, 4
        folder = scratch / f"{arch}-pipeline"
        pipe = build_pipeline(arch, device, tiny)
        pipe.save_pretrained(folder)
        del pipe
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
        settings = GenerationSettings(steps=steps, guidance=guidance, width=size, height=size)
        return lab.add_generator(arch, "diffusers", source=folder, settings=settings, resyntheses=1)

    return add


def bench_cli(scratch: Path, kind: str, device: str, tiny: bool) -> list[bench.Row]:
    """The product-path rows: SD1.5 through `rsx resynthesize`, `rsx ingest`, `rsx query`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights may decode to NaN pixels
        return cli_rows(
            scratch,
            kind=kind,
            add_generator=saved_generator("sd15", device, tiny, scratch),
            label="tiny sd15 64px 4 steps" if tiny else "sd15 512px 25 steps",
            gen_batch=4 if tiny else 16,
            gen_sizes=(4, 12) if tiny else (16, 48),
            ingest_batch=8 if tiny else 64,
            ingest_sizes=(8, 40) if tiny else (64, 320),
            image_size=64 if tiny else 512,
            query_sizes=(1, 5) if tiny else (2, 18),
            repeat=1,
            device=device,
            embed_target=None if tiny else 0.8,
            gen_target=None if tiny else 0.85,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a logic check on a CPU)")
    parser.add_argument("--vectors", type=int, help="stored vectors in the query lab")
    parser.add_argument(
        "--skip", default="", help="comma-separated rows to skip: sd15,sdxl,embedder,cli"
    )
    args = parser.parse_args(argv)
    import torch

    tiny = args.tiny
    if not tiny and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; use --tiny for a logic check", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vectors = args.vectors if args.vectors is not None else (2_000 if tiny else 1_000_000)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"rsx gpu bench on {name}, torch {torch.__version__}, tiny={tiny}", flush=True)
    began = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="rsx-gpu-bench-"))
    rows: list[bench.Row] = []
    notes: list[str] = []
    try:
        for arch in ("sd15", "sdxl"):
            if arch not in skip:
                rows.append(bench_generation_arch(arch, tiny=tiny))
                bench.print_row(rows[-1])
        kind = "toy" if tiny else "ViT-L-14-336"
        if "embedder" not in skip:
            size, n, batch = (64, 32, 8) if tiny else (512, 1024, 64)
            found, note = bench.bench_embedder(
                kind,
                scratch,
                size=size,
                n=n,
                batch=batch,
                vectors=vectors,
                k=2 if tiny else 8,
                queries=3 if tiny else 20,
                device=device,
            )
            rows.extend(found)
            notes.append(note)
        rows.append(bench.bench_help(5))
        if "cli" not in skip:
            rows.extend(bench_cli(scratch, kind, device, tiny))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    bench.print_report(rows, notes)
    print(f"gpu bench total {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
