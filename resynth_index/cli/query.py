"""`rsx query`: who made this image? Rendering of the answers for people.

Long work shows on a terminal: a status line (stderr) of images read, resyntheses generated per
generator and batch, and embedding; piped output stays clean. What a call will generate is said
before it starts, and a call that would generate more than ``GENERATION_CAP`` images asks for
``--yes``. Ctrl-C says how many resyntheses were kept (each batch is stored whole) and exits 130.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import click

from resynth_index.cli.app import StatusLine, cli, open_lab
from resynth_index.cli.executors import executor_options, ray_options
from resynth_index.cli.generation import GENERATION_CAP, GenerationProgress, announce_plan
from resynth_index.cli.render import render_answer

if TYPE_CHECKING:
    pass

#: The most generations one ``rsx query`` makes unless ``--yes`` is given.


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--caption", help="The description to resynthesise from (else sidecar/metadata/model)."
)
@click.option(
    "--candidates",
    help="Comma-separated generator names (default: the lab's default_candidates, else all"
    " active; see 'rsx config').",
)
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
@click.option("--force", is_flag=True, help="Replace the --report file if it exists.")
@click.option(
    "--yes",
    is_flag=True,
    help=f"Generate even when the call plans more than {GENERATION_CAP} generations.",
)
@click.option(
    "--method",
    type=click.Choice(["resynthesis", "fused"]),
    default="resynthesis",
    show_default=True,
    help="fused: also each candidate autoencoder's reconstruction of the image, and the"
    " embedder's intermediate layers (look-alikes), weighted as 'rsx calibrate --method fused'"
    " chose on the lab's references, else equally.",
)
@click.option(
    "--fusion-layers",
    help="With --method fused: embedder blocks to fuse (e.g. 1,2,3; default: those of the lab's"
    " fused calibration, none without one).",
)
@executor_options
@click.pass_context
def query(
    ctx,
    images,
    caption,
    candidates,
    resyntheses,
    no_generate,
    captioner,
    as_json,
    report,
    force,
    yes,
    method,
    fusion_layers=None,
    executor="local",
    ray_address=None,
    ray_actors=None,
) -> None:
    """Name the generator that most likely made each image.

    IMAGES are image files or folders (walked for their image files); caption sidecars and
    other .txt, .json and .csv files among them are skipped.

    \b
    Examples:
      rsx query suspect.png --caption "a lighthouse at dusk, oil painting"
      rsx query a.png b.png --candidates sd15,sdxl,midjourney --json
      rsx query suspect.png --report suspect.html
      rsx query ./suspects/ --resyntheses 16 --yes
      rsx query ./suspects/ --executor ray --ray-address auto
      rsx query suspect.png --method fused

    The exit status is 1 when an image failed or got no evidence (no candidate had a
    resynthesis of its caption to compare with, e.g. under --no-generate).
    """
    from resynth_index.attribution.answer import NO_EVIDENCE, QueryFailure
    from resynth_index.attribution.evidence.layers import parse_layers
    from resynth_index.pipeline.query import run_queries

    layers = parse_layers(fusion_layers)
    if layers and method != "fused":
        raise click.ClickException("--fusion-layers applies to --method fused only")
    on_ray = ray_options(executor, ray_address, ray_actors)
    if report is not None:
        _check_report_path(report, force)
    lab = open_lab(ctx)
    names = [n.strip() for n in candidates.split(",") if n.strip()] if candidates else None
    model = None
    captioner_path = captioner or lab.settings.captioner
    if captioner_path:
        from resynth_index.models.captioners import TransformersCaptioner

        model = TransformersCaptioner(captioner_path, device=lab.device)
    status = StatusLine()
    watch = GenerationProgress(status)
    runner = None
    if on_ray is not None:
        from resynth_index.distributed.executor import RayResynthesizer

        runner = RayResynthesizer(lab, on_ray)
    try:
        with status:
            results = run_queries(
                lab,
                list(images),
                caption=caption,
                candidates=names,
                resyntheses=resyntheses,
                generate=not no_generate,
                captioner=model,
                progress=watch,
                on_plan=partial(
                    announce_plan,
                    status,
                    yes,
                    what="a query",
                    smaller="lower --resyntheses or --candidates",
                ),
                method=method,
                generator=runner.for_query if runner is not None else None,
                fusion_layers=layers or None,
            )
    except KeyboardInterrupt:
        click.echo(f"interrupted: {watch.kept()}; rerun to continue", err=True)
        ctx.exit(130)
    finally:
        if runner is not None:
            runner.close()
    failed = 0
    unanswered = []  # answers without evidence: no candidate had a resynthesis to compare
    for result in results:
        if isinstance(result, QueryFailure):
            failed += 1
            click.echo(f"failed: {result.image}: {result.error}", err=True)
            if as_json:
                click.echo(json.dumps({"image": result.image, "error": result.error}))
            continue
        if result.verdict == NO_EVIDENCE:
            unanswered.append(result)
        if as_json:
            click.echo(json.dumps(result.to_json(), sort_keys=True))
        else:
            click.echo(render_answer(result))
    if report:
        from resynth_index.report import write_report

        answered = [r for r in results if not isinstance(r, QueryFailure)]
        if answered:
            write_report(lab, answered, report)
            click.echo(f"report written to {report}", err=as_json)
        else:
            click.echo(f"no report written to {report}: every image failed", err=True)
    for result in unanswered:
        lacking = ", ".join(result.without_resynthesis or result.candidates)
        hint = " (--no-generate: drop it to generate them)" if result.not_generated else ""
        click.echo(
            f"no evidence: {result.image}: no resynthesis of its caption by {lacking}{hint}",
            err=True,
        )
    if failed or unanswered:
        sys.exit(1)


def _check_report_path(report: Path, force: bool) -> None:
    """Refuse, before any work, a report that could not be written or would replace a file."""
    folder = report.parent  # Path("r.html").parent is Path(".")
    if not folder.is_dir():
        raise click.ClickException(
            f"cannot write the report {report}: folder {folder} does not exist"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.ClickException(
            f"cannot write the report {report}: folder {folder} is not writable"
        )
    if report.exists() or report.is_symlink():
        if report.is_dir():
            raise click.ClickException(f"cannot write the report {report}: it is a folder")
        if not force:
            raise click.ClickException(
                f"report {report} already exists; pass --force to replace it"
            )
        if not os.access(report, os.W_OK):
            raise click.ClickException(f"cannot write the report {report}: it is read-only")
