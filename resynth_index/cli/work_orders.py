"""`rsx export-prompts` and `rsx resynthesize`: filling the cache of resyntheses."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import click

from resynth_index.cli.app import cli, open_lab, progress_bar
from resynth_index.cli.executors import executor_options, ray_options


@cli.command("export-prompts")
@click.option("--generator", "generator_name", help="Only this imported generator.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write CSV here (default: standard output).",
)
@click.pass_context
def export_prompts(ctx, generator_name: str | None, out: Path | None) -> None:
    """The work order for imported generators: captions queries needed that they lack.

    Produce the images with the service, then ingest them as a manifest with role
    'resynthesis'; the CSV already has the columns such a manifest needs (fill in 'path').
    A cell that a spreadsheet would run as a formula (starting with = + - @, a tab or a
    carriage return) is written with a ' in front; rsx ingest takes that one quote off again.
    With nothing pending the CSV holds its header alone (still a valid manifest), and stderr
    says so.

    \b
    Examples:
      rsx export-prompts --generator midjourney --out mj_todo.csv
      rsx export-prompts > todo.csv
    """
    from resynth_index.pipeline.work_orders import pending_work, write_work_orders

    rows = pending_work(open_lab(ctx), generator_name)
    handle = open(out, "w", newline="", encoding="utf-8") if out else sys.stdout
    try:
        write_work_orders(rows, handle)
    finally:
        if out:
            handle.close()
    if not rows:
        which = f" for {generator_name}" if generator_name else ""
        where = str(out) if out else "the CSV"
        click.echo(f"no pending work orders{which}: {where} holds the header only", err=True)
    elif out:
        click.echo(f"{len(rows)} prompt(s) written to {out}")


@cli.command()
@click.option(
    "--captions",
    "captions_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Captions to precompute: one per line, or a CSV with a 'caption' column.",
)
@click.option("--pending", is_flag=True, help="Every caption queries have asked for.")
@click.option("--generator", "generator_name", help="Only this generator (default: all runnable).")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Images generated per batch (default: the lab's generation_batch_size; 'auto' chooses "
    "per generator for the device).",
)
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@executor_options
@click.pass_context
def resynthesize(
    ctx,
    captions_file: Path | None,
    pending: bool,
    generator_name,
    batch_size,
    as_json: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
    ray_actors: int | None = None,
):
    """Precompute the missing resyntheses of many captions (fill the cache overnight).

    Work is grouped per generator and made in batches; each batch is stored (images, rows,
    embeddings) while the next is generated, so an interrupted run keeps what it generated and a
    re-run makes only the rest. The summary says the batch each generator was made in (under
    the default 'auto': 16 for SD1.5 at 512 px on CUDA, scaled by image size and fitted to free
    memory; 4 on a CPU).

    \b
    Examples:
      rsx resynthesize --captions prompts.txt --batch-size 16
      rsx resynthesize --pending --generator sd15
      rsx resynthesize --captions prompts.txt --executor ray --ray-address auto
    """
    from resynth_index.pipeline import plans, resynthesis

    if (captions_file is None) == (not pending):
        raise click.UsageError("give either --captions FILE or --pending")
    on_ray = ray_options(executor, ray_address, ray_actors)
    lab = open_lab(ctx)
    generators = plans.runnable_generators(lab, generator_name)
    if captions_file is None:  # --pending
        captions = plans.pending_captions(lab)
    else:
        captions = plans.captions_by_hash(plans.read_captions_file(captions_file))
    bar = None

    def start(total: int) -> None:
        nonlocal bar
        bar = progress_bar("generating", total)
        if bar is not None:
            bar.__enter__()

    run = resynthesis.resynthesize
    if on_ray is not None:
        from resynth_index.distributed.executor import resynthesize_with_ray

        run = partial(resynthesize_with_ray, options=on_ray)
    try:
        summary = run(
            lab,
            captions,
            generators,
            batch_size=batch_size,
            on_plan=start,
            progress=lambda n: bar.update(n) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    setting = batch_size or lab.settings.generation_batch_size
    if as_json:
        click.echo(
            json.dumps(
                {
                    "captions": summary.captions,
                    "generators": summary.generators,
                    "generated": summary.generated,
                    "reused": summary.reused,
                    "batch_setting": setting,
                    "batch_sizes": summary.batch_sizes,
                },
                sort_keys=True,
            )
        )
        return
    click.echo(
        f"resynthesize: {summary.captions} caption(s) x {len(summary.generators)} generator(s): "
        f"{summary.generated} generated, {summary.reused} already stored"
        + _batches(summary.batch_sizes, setting)
    )


def _batches(sizes: dict[str, int], setting: object) -> str:
    """ "; batch 4 (auto)" or "; batch sd15 16, sdxl 4 (auto)": what each generator was made in
    ("" when nothing was generated)."""
    if not sizes:
        return ""
    values = set(sizes.values())
    shown = (
        str(values.pop())
        if len(values) == 1
        else ", ".join(f"{name} {size}" for name, size in sizes.items())
    )
    return f"; batch {shown}" + (" (auto)" if setting == "auto" else "")
