"""`rsx ingest`: images, folders and manifests into the lab."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from resynth_index.cli.app import cli, open_lab, progress_bar


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--role",
    type=click.Choice(["query", "resynthesis", "reference"]),
    default="query",
    show_default=True,
    help="Role of the plain files given.",
)
@click.option("--generator", "generator_name", help="Generator of the plain files given.")
@click.option("--caption", help="Caption of the plain files given.")
@click.option(
    "--layout",
    type=click.Choice(["files", "resynthesis-dataset"]),
    default="files",
    show_default=True,
    help="How to read PATHS.",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per batch.")
@click.pass_context
def ingest(ctx, paths, role, generator_name, caption, layout, batch_size) -> None:
    """Add images, folders and manifests (CSV / JSON lines) to the lab.

    Manifest columns: path, role (query | resynthesis | reference), generator, caption, seed;
    relative paths resolve against the manifest. Re-running is cheap: what is stored is skipped.

    \b
    Examples:
      rsx ingest ./suspects/
      rsx ingest mj_batch.csv
      rsx ingest ./refs/*.png --role reference --generator midjourney
      rsx ingest ~/data/resynthesis-dataset --layout resynthesis-dataset
    """
    from resynth_index.pipeline import ingest as ingest_module

    lab = open_lab(ctx)
    if layout == "resynthesis-dataset":
        items = [i for p in paths for i in ingest_module.resynthesis_dataset(p)]
    else:
        items = list(
            ingest_module.expand_paths(paths, role=role, generator=generator_name, caption=caption)
        )
    bar = progress_bar("ingesting", len(items))

    def report_failure(failure) -> None:
        click.echo(f"failed: {failure.path}: {failure.reason}", err=True)

    if bar is None:
        summary = ingest_module.ingest(
            lab,
            items,
            batch_size=batch_size,
            on_failure=report_failure,
            register_missing_as_imported=layout == "resynthesis-dataset",
        )
    else:
        with bar:
            summary = ingest_module.ingest(
                lab,
                items,
                batch_size=batch_size,
                progress=bar.update,
                on_failure=report_failure,
                register_missing_as_imported=layout == "resynthesis-dataset",
            )
    for name in summary.generators_added:
        click.echo(f"registered imported generator {name}")
    click.echo(
        f"ingest: {summary.added} added, {summary.skipped} skipped (already present), "
        f"{summary.failed} failed"
    )
    if summary.failed:
        sys.exit(1)
