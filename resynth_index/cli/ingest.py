"""`rsx ingest`: images, folders and manifests into the lab."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from resynth_index.cli.app import cli, open_lab, progress_bar
from resynth_index.cli.executors import executor_options, ray_options

#: Exit status after Ctrl-C, as a shell reports a process ended by SIGINT (128 + 2).
INTERRUPTED_EXIT = 130


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--role",
    type=click.Choice(["query", "resynthesis", "reference"]),
    default="query",
    show_default=True,
    help="Role of the plain files given.",
)
@click.option(
    "--generator",
    "generator_name",
    help="Generator of the plain files given (with --role reference or resynthesis).",
)
@click.option("--caption", help="Caption of the plain files given.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    help="With --role resynthesis: the seed the plain files were made with (a runnable "
    "generator's resyntheses need it; an imported one's take the next free seeds without it).",
)
@click.option(
    "--layout",
    type=click.Choice(["files", "resynthesis-dataset"]),
    default="files",
    show_default=True,
    help="How to read PATHS.",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per batch.")
@click.option(
    "--reread",
    is_flag=True,
    help="Read every file, even one unchanged since it was stored (restores a blob that "
    "'rsx check' finds altered when its size and times did not change).",
)
@click.option(
    "--workers",
    default="auto",
    show_default=True,
    metavar="N|auto",
    help="Worker processes that read, hash, decode and preprocess the files and write their "
    "blobs while this process stores and embeds them; 0 reads them on a thread. auto leaves one "
    "core for this process and runs workers only when 2 or more cores remain and there are 128 "
    "or more files per worker (else the thread).",
)
@executor_options
@click.pass_context
def ingest(
    ctx,
    paths,
    role,
    generator_name,
    caption,
    seed,
    layout,
    batch_size,
    reread,
    workers="auto",
    executor="local",
    ray_address=None,
    ray_actors=None,
) -> None:
    """Add images, folders and manifests (CSV / JSON lines) to the lab.

    Manifest columns: path, role (query | resynthesis | reference), generator, caption, seed;
    relative paths resolve against the manifest. A row with a caption_hash (an exported work
    order) must keep the caption it was exported with. Re-running is cheap: what is stored is
    skipped, so an interrupted ingest (Ctrl-C) continues where it stopped when run again; a file
    unchanged since it was stored (same path, size, times, inode) is skipped without being read.
    Arguments and inputs are checked before any model loads.

    \b
    Examples:
      rsx ingest ./suspects/
      rsx ingest mj_batch.csv
      rsx ingest ./refs/*.png --role reference --generator midjourney
      rsx ingest made.png --role resynthesis --generator sd15 --caption "a cat" --seed 0
      rsx ingest ~/data/resynthesis-dataset --layout resynthesis-dataset
      rsx ingest ./archive/ --executor ray --ray-address auto   # embeddings on the cluster
      rsx ingest ./archive/ --workers 8   # read and decode in 8 processes

    With --executor ray the files are still read, checked and stored here; the lab's embedder
    runs on the cluster's actors (checked to be the lab's, by fingerprint).
    """
    from resynth_index.pipeline import ingest as ingest_module
    from resynth_index.pipeline import ingest_items

    plain = [p for p in paths if p.suffix.lower() not in ingest_items.MANIFEST_SUFFIXES]
    worker_count = _workers(workers)
    _check_options(layout, role, generator_name, caption, seed, bool(plain))
    on_ray = ray_options(executor, ray_address, ray_actors)
    summary = None
    pool = None
    try:
        lab = open_lab(ctx)
        if layout == "resynthesis-dataset":
            items = [i for p in paths for i in ingest_items.resynthesis_dataset(p)]
        else:
            if plain:  # said once here, not once per file
                ingest_module.check_plain_options(
                    lab, role=role, generator=generator_name, seed=seed
                )
            items = list(
                ingest_items.expand_paths(
                    paths, role=role, generator=generator_name, caption=caption, seed=seed
                )
            )
        if not any(isinstance(item, ingest_items.IngestItem) for item in items):
            _nothing_to_ingest(items)
        if on_ray is not None:
            from resynth_index.distributed.embedding import RayEmbedder

            pool = RayEmbedder(lab, on_ray)
            lab.adopt_embedder(pool)
        summary = _run(
            ingest_module,
            lab,
            items,
            batch_size,
            layout == "resynthesis-dataset",
            reread,
            worker_count,
        )
    except KeyboardInterrupt as interrupt:
        stored = (
            interrupt.summary.added if isinstance(interrupt, ingest_module.IngestInterrupted) else 0
        )
        click.echo(
            f"interrupted: {stored} images stored; rerun the same command to continue:"
            " ingest is resumable",
            err=True,
        )
        sys.exit(INTERRUPTED_EXIT)
    finally:
        if pool is not None:
            pool.close()
    for name in summary.generators_added:
        click.echo(f"registered imported generator {name}")
    unchanged = (
        f"; {summary.unchanged} unchanged (skipped by size and time)" if summary.unchanged else ""
    )
    click.echo(
        f"ingest: {summary.added} added, {summary.skipped} skipped (already present), "
        f"{summary.failed} failed{unchanged}"
    )
    if summary.failed:
        sys.exit(1)


def _check_options(
    layout: str,
    role: str,
    generator: str | None,
    caption: str | None,
    seed: int | None,
    has_plain_files: bool,
) -> None:
    """Refuse option combinations that cannot mean anything, once, before the lab opens."""
    if layout == "resynthesis-dataset":
        given = [
            flag
            for flag, value in (
                ("--generator", generator),
                ("--caption", caption),
                ("--seed", seed),
                ("--role", None if role == "query" else role),
            )
            if value is not None
        ]
        if given:
            raise click.UsageError(
                "--layout resynthesis-dataset reads roles, generators and captions from the"
                f" folders; drop {', '.join(given)}"
            )
        return
    if seed is not None and role != "resynthesis":
        raise click.UsageError("--seed goes with --role resynthesis")
    if not has_plain_files:
        return  # manifests say each line's role, generator, caption and seed
    if role == "query" and generator is not None:
        raise click.UsageError(
            "--generator goes with --role reference or --role resynthesis; a query's generator"
            " is what rsx query finds out"
        )
    if role != "query" and generator is None:
        raise click.UsageError(
            f"--role {role} needs --generator NAME: the generator that made these images"
        )


def _nothing_to_ingest(items: list) -> None:
    """No image to load at all: when every failure is an input naming nothing, say so in one
    line and exit 1 (other failures are reported as usual, without loading any model)."""
    from resynth_index.pipeline.ingest_items import NO_IMAGES_IN_FOLDER, NO_IMAGES_MATCH

    empty = [item.path for item in items if item.reason == NO_IMAGES_IN_FOLDER]
    unmatched = [item.path for item in items if item.reason == NO_IMAGES_MATCH]
    if items and len(empty) + len(unmatched) == len(items):
        said = []
        if empty:
            said.append(f"no images found in {', '.join(empty)}")
        if unmatched:
            said.append(f"no images found matching {', '.join(unmatched)}")
        raise click.ClickException("; ".join(said))


def _workers(text: str) -> int | None:
    """``--workers``: a count of 0 or more, or auto (None)."""
    if text.strip().lower() == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise click.BadParameter(
            f"{text!r} is not a count of 0 or more, nor auto", param_hint="--workers"
        )
    return count


def _run(
    ingest_module,
    lab,
    items: list,
    batch_size: int | None,
    dataset: bool,
    reread: bool,
    workers: int | None = None,
):
    """Ingest ``items`` with a progress bar on a terminal; failures print as they come."""
    bar = progress_bar("ingesting", len(items))

    def report_failure(failure) -> None:
        click.echo(f"failed: {failure.path}: {failure.reason}", err=True)

    options = {
        "batch_size": batch_size,
        "on_failure": report_failure,
        "register_missing_as_imported": dataset,
        "reread": reread,
        "workers": workers,
    }
    if bar is None:
        return ingest_module.ingest(lab, items, **options)
    with bar:
        return ingest_module.ingest(lab, items, progress=bar.update, **options)
