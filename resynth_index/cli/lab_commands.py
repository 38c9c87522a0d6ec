"""`rsx init` and `rsx check`: creating a lab and verifying it."""

from __future__ import annotations

import sys

import click

from resynth_index.cli.app import cli, open_lab


@cli.command()
@click.option(
    "--embedder",
    default="toy",
    show_default=True,
    help="'toy', 'local-dir:FOLDER' (open_clip_config.json + weights) or 'ARCH@WEIGHTS_FILE'.",
)
@click.option("--layer", type=click.IntRange(min=1), help="Use the class token of this ViT block.")
@click.option("--threshold", type=float, help="Distance above which the verdict is 'unknown'.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    default="auto",
    show_default=True,
    help="Embedder precision, fixed with the lab ('auto': fp16 on CUDA, else fp32).",
)
@click.pass_context
def init(
    ctx: click.Context, embedder: str, layer: int | None, threshold: float | None, precision: str
) -> None:
    """Create a lab. Its embedder is fixed here, for good.

    \b
    Examples:
      rsx --lab ./lab init                       # the toy embedder
      rsx --lab ./lab init --embedder ViT-L-14-336@/models/clip-l-336.safetensors --layer 12
      rsx --lab ./lab init --embedder local-dir:/models/my-clip
    """
    from resynth_index.lab import Lab

    lab = Lab.create(
        ctx.obj["lab_dir"],
        embedder=embedder,
        layer=layer,
        device=ctx.obj["device"] or "auto",
        precision=precision,
    )
    if threshold is not None:
        lab.settings.unknown_threshold = threshold
        lab.settings.save(lab.root)
    click.echo(
        f"created lab {lab.root} (embedder {embedder}, fingerprint {lab.fingerprint[:12]}, "
        f"dim {lab.settings.embedder_dim})"
    )


@cli.command()
@click.option("--repair", is_flag=True, help="Rebuild what can be derived; name what cannot.")
@click.pass_context
def check(ctx: click.Context, repair: bool) -> None:
    """Verify the database against the blob store and the vector index.

    Prints one line per problem and exits non-zero when any remains.

    \b
    Examples:
      rsx --lab ./lab check
      rsx --lab ./lab check --repair
    """
    lab = open_lab(ctx)
    report = lab.check(repair=repair)
    for line in report.notes:
        click.echo(f"note: {line}")
    for line in report.problems:
        click.echo(f"problem: {line}")
    for line in report.repaired:
        click.echo(f"repaired: {line}")
    for line in report.unrepairable:
        click.echo(f"cannot repair: {line}")
    if not report.problems:
        click.echo("ok: database, blobs and index agree")
    elif not repair or report.unrepairable:
        sys.exit(1)
