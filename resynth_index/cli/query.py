"""`rsx query`: who made this image? Rendering of the answers for people."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from resynth_index.cli.app import cli, open_lab
from resynth_index.cli.render import render_answer


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--caption", help="The description to resynthesise from (else sidecar/metadata/model)."
)
@click.option("--candidates", help="Comma-separated generator names (default: all active).")
@click.option("--resyntheses", type=click.IntRange(min=1), help="Resyntheses per generator (K).")
@click.option("--no-generate", is_flag=True, help="Use only stored resyntheses.")
@click.option(
    "--captioner",
    type=click.Path(path_type=Path),
    help="A local transformers image-to-text folder for images without a caption.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a self-contained HTML report.",
)
@click.pass_context
def query(
    ctx, images, caption, candidates, resyntheses, no_generate, captioner, as_json, report
) -> None:
    """Name the generator that most likely made each image.

    \b
    Examples:
      rsx query suspect.png --caption "a lighthouse at dusk, oil painting"
      rsx query a.png b.png --candidates sd15,sdxl,midjourney --json
      rsx query suspect.png --report suspect.html
    """
    from resynth_index.pipeline.query import QueryFailure, run_queries

    lab = open_lab(ctx)
    names = [n.strip() for n in candidates.split(",") if n.strip()] if candidates else None
    model = None
    captioner_path = captioner or lab.settings.captioner
    if captioner_path:
        from resynth_index.models.captioners import TransformersCaptioner

        model = TransformersCaptioner(captioner_path, device=lab.device)
    results = run_queries(
        lab,
        list(images),
        caption=caption,
        candidates=names,
        resyntheses=resyntheses,
        generate=not no_generate,
        captioner=model,
    )
    failed = 0
    for result in results:
        if isinstance(result, QueryFailure):
            failed += 1
            click.echo(f"failed: {result.image}: {result.error}", err=True)
            if as_json:
                click.echo(json.dumps({"image": result.image, "error": result.error}))
            continue
        if as_json:
            click.echo(json.dumps(result.to_json(), sort_keys=True))
        else:
            click.echo(render_answer(result))
    if report:
        from resynth_index.report import write_report

        write_report(lab, [r for r in results if not isinstance(r, QueryFailure)], report)
        click.echo(f"report written to {report}", err=as_json)
    if failed:
        sys.exit(1)
