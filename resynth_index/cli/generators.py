"""`rsx generator add|list|remove`: the candidate generators."""

from __future__ import annotations

import json
from pathlib import Path

import click

from resynth_index.cli.app import RsxGroup, cli, open_lab


@cli.group(cls=RsxGroup)
def generator() -> None:
    """Register, list and retire candidate generators."""


def _parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise click.BadParameter("width and height must be positive multiples of 8")
    return width, height


@generator.command("add")
@click.argument("name")
@click.option(
    "--diffusers",
    "diffusers_path",
    type=click.Path(path_type=Path),
    help="A local diffusers pipeline folder or single-file checkpoint.",
)
@click.option(
    "--config",
    "config_dir",
    type=click.Path(path_type=Path),
    help="For a single-file checkpoint: a local pipeline folder with its configs.",
)
@click.option("--imported", is_flag=True, help="A service the lab cannot run; ingest its images.")
@click.option("--toy", "toy_seed", type=int, help="A toy pipeline built from this seed.")
@click.option("--steps", type=click.IntRange(min=1), help="Denoising steps.")
@click.option("--guidance", type=float, help="Classifier-free guidance scale.")
@click.option("--size", help="Output size WIDTHxHEIGHT.")
@click.option("--scheduler", help="A diffusers scheduler class name, e.g. DDIMScheduler.")
@click.option("--negative-prompt", help="Negative prompt for every resynthesis.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--resyntheses", type=click.IntRange(min=1), help="Resyntheses per caption (K).")
@click.option(
    "--check-load", is_flag=True, help="Also load the pipeline once before registering it."
)
@click.pass_context
def generator_add(
    ctx,
    name,
    diffusers_path,
    config_dir,
    imported,
    toy_seed,
    steps,
    guidance,
    size,
    scheduler,
    negative_prompt,
    dtype,
    resyntheses,
    check_load,
) -> None:
    """Register a candidate generator. Nothing already stored is recomputed.

    A diffusers folder is checked before it is registered (model_index.json, its pipeline
    class, every component's folder and config); --check-load also loads it once.

    \b
    Examples:
      rsx generator add sd15 --diffusers /models/stable-diffusion-v1-5 --steps 25
      rsx generator add sdxl --diffusers /models/sdxl --size 1024x1024 --resyntheses 3
      rsx generator add midjourney --imported
      rsx generator add toy-a --toy 1
    """
    chosen = [diffusers_path is not None, imported, toy_seed is not None]
    if sum(chosen) != 1:
        raise click.UsageError("give exactly one of --diffusers PATH, --imported, --toy SEED")
    tuning = {
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "negative_prompt": negative_prompt,
        "dtype": dtype,
    }
    parsed_size = _parse_size(size)
    if parsed_size:
        tuning["width"], tuning["height"] = parsed_size
    tuning = {k: v for k, v in tuning.items() if v is not None}
    # every argument is checked before anything is written
    if imported and tuning:
        raise click.UsageError("an imported generator takes no generation settings")
    if toy_seed is not None and tuning:
        raise click.UsageError("a toy generator uses the toy settings; drop the tuning")
    if config_dir is not None and diffusers_path is None:
        raise click.UsageError("--config goes with --diffusers (a single-file checkpoint)")
    if check_load and diffusers_path is None:
        raise click.UsageError("--check-load goes with --diffusers")
    if diffusers_path is not None:
        from resynth_index.models.generators.protocol import GenerationSettings

        settings = GenerationSettings.from_dict({**GenerationSettings().to_dict(), **tuning})
    lab = open_lab(ctx)
    if imported:
        row = lab.add_generator(name, "imported", resyntheses=resyntheses)
    elif toy_seed is not None:
        row = lab.add_toy_generator(name, toy_seed, resyntheses=resyntheses)
    else:
        row = lab.add_generator(
            name,
            "diffusers",
            source=diffusers_path,
            settings=settings,
            resyntheses=resyntheses,
            config=config_dir,
            check_load=check_load,
        )
    click.echo(f"added generator {row.name} ({row.kind}, fingerprint {row.fingerprint[:12]})")


@generator.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--all", "show_all", is_flag=True, help="Include retired generators.")
@click.pass_context
def generator_list(ctx, as_json: bool, show_all: bool) -> None:
    """List the lab's generators.

    \b
    Examples:
      rsx generator list
      rsx generator list --all --json
    """
    lab = open_lab(ctx)
    rows = lab.generators(include_retired=show_all)
    for row in rows:
        record = {
            "name": row.name,
            "kind": row.kind,
            "source": row.source,
            "settings": json.loads(row.settings_json),
            "fingerprint": row.fingerprint,
            "added_at": row.added_at.isoformat(),
            "retired_at": row.retired_at.isoformat() if row.retired_at else None,
        }
        if as_json:
            click.echo(json.dumps(record, sort_keys=True))
        else:
            state = " (retired)" if row.retired_at else ""
            click.echo(
                f"{row.name:<20} {row.kind:<10} {row.fingerprint[:12]}  {row.source or '-'}{state}"
            )
    if not rows and not as_json:
        click.echo("no generators; add one with 'rsx generator add'")


@generator.command("remove")
@click.argument("name")
@click.pass_context
def generator_remove(ctx, name: str) -> None:
    """Retire a generator: its data stays, it stops being a candidate.

    \b
    Example:
      rsx generator remove sd15
    """
    open_lab(ctx).retire_generator(name)
    click.echo(f"retired generator {name}")
