"""`rsx generator add|list|set|remove|retire|restore`: the candidate generators (`retire` is
`remove` by the word the help uses)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from resynth_index.cli.app import RsxGroup, cli, open_lab


@cli.group(cls=RsxGroup)
def generator() -> None:
    """Register, list, tune, retire and restore candidate generators."""


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


def _finite_guidance(_ctx: click.Context, _param: click.Parameter, value: float | None):
    """--guidance: any finite number (nan and inf would poison every resynthesis)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value!r} is not a finite number")
    return value


_DTYPE_HELP = (
    "Weights' precision: auto (float16 on CUDA, float32 elsewhere), float32, float16 or bfloat16."
)


def _generation_options(*, editing: bool):
    """The generation settings `generator add` takes and `generator set` changes.

    When editing, an empty --scheduler or --negative-prompt clears what was set.
    """
    scheduler_help = "A diffusers scheduler class name, e.g. DDIMScheduler"
    negative_help = "Negative prompt for every resynthesis"
    options = [
        click.option("--steps", type=click.IntRange(min=1), help="Denoising steps."),
        click.option(
            "--guidance",
            type=float,
            callback=_finite_guidance,
            help="Classifier-free guidance scale.",
        ),
        click.option("--size", help="Output size WIDTHxHEIGHT."),
        click.option(
            "--scheduler",
            help=scheduler_help + ("; '' keeps the pipeline's own." if editing else "."),
        ),
        click.option(
            "--negative-prompt", help=negative_help + ("; '' for none." if editing else ".")
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
            help=_DTYPE_HELP,
        ),
        click.option(
            "--resyntheses", type=click.IntRange(min=1), help="Resyntheses per caption (K)."
        ),
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


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
@_generation_options(editing=False)
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
    """List the lab's generators: kind, steps, guidance, size, resyntheses per caption (K),
    status, fingerprint and model files. An imported generator's settings are unknown ('-').

    \b
    Examples:
      rsx generator list
      rsx generator list --all --json
    """
    from resynth_index.models.generators.factory import settings_summary

    lab = open_lab(ctx)
    if as_json:
        for record in lab.generator_records(include_retired=show_all):
            click.echo(json.dumps(record, sort_keys=True))
        return
    rows = lab.generators(include_retired=show_all)
    table = [["NAME", "KIND", "STEPS", "GUIDANCE", "SIZE", "K", "STATUS", "FINGERPRINT", "SOURCE"]]
    for row in rows:
        status = "retired" if row.retired_at else "active"
        summary = settings_summary(row.kind, row.settings_json)
        size = (
            f"{summary['width']}x{summary['height']}"
            if summary["width"] is not None and summary["height"] is not None
            else None
        )
        cells: list[Any] = [
            row.name,
            row.kind,
            summary["steps"],
            f"{summary['guidance']:g}" if summary["guidance"] is not None else None,
            size,
            summary["resyntheses"],
            status,
            row.fingerprint[:12],
            row.source,
        ]
        table.append(["-" if cell is None else str(cell) for cell in cells])
    if as_json:
        return
    if not rows:
        click.echo("no generators; add one with 'rsx generator add'")
        return
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        padded = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        click.echo("  ".join([*padded, line[-1]]).rstrip())


@generator.command("remove")
@click.argument("name")
@click.pass_context
def generator_remove(ctx, name: str) -> None:
    """Retire a generator: its data stays, it stops being a candidate.

    \b
    Examples:
      rsx generator remove sd15
      rsx generator retire sd15      # the same
    """
    _retire(ctx, name)


@generator.command("retire", short_help="Alias of 'remove': retire a generator, data kept.")
@click.argument("name")
@click.pass_context
def generator_retire(ctx, name: str) -> None:
    """Retire a generator (the same as 'remove'): its data stays, it stops being a candidate.

    'rsx generator restore NAME' makes it a candidate again.

    \b
    Examples:
      rsx generator retire sd15
      rsx generator restore sd15
    """
    _retire(ctx, name)


def _retire(ctx: click.Context, name: str) -> None:
    """What 'remove' and its alias 'retire' do: retire ``name``, keeping everything it made."""
    open_lab(ctx).retire_generator(name)
    click.echo(f"retired generator {name}")


@generator.command("restore")
@click.argument("name")
@click.pass_context
def generator_restore(ctx, name: str) -> None:
    """Bring a retired generator back as a candidate, with everything it made.

    Its model files are checked against its registered fingerprint when it next runs; a
    generator whose weights changed meanwhile is refused then.

    \b
    Examples:
      rsx generator restore sd15
      rsx query old-case.png --candidates sd15,sdxl
    """
    open_lab(ctx).restore_generator(name)
    click.echo(f"restored generator {name}: a candidate again")


@generator.command("set")
@click.argument("name")
@_generation_options(editing=True)
@click.pass_context
def generator_set(
    ctx, name, steps, guidance, size, scheduler, negative_prompt, dtype, resyntheses
) -> None:
    """Change a generator's settings. An imported generator takes only --resyntheses.

    New generation settings give a new settings hash, the key under which resyntheses are
    stored: queries from now on make (and then reuse) resyntheses under the new settings. The
    ones made under the old settings stay in the lab, keyed by the old hash, and answers that
    used them still show them. The change (old and new settings and fingerprints, and when) is
    kept in the generator's settings record, under 'settings_history' (rsx generator list
    --json). Everything is checked before anything is written.

    \b
    Examples:
      rsx generator set sd15 --steps 30 --guidance 6
      rsx generator set sdxl --size 1024x1024 --scheduler EulerDiscreteScheduler
      rsx generator set sd15 --negative-prompt ''
      rsx generator set midjourney --resyntheses 4
    """
    changes: dict[str, Any] = {
        "steps": steps,
        "guidance": guidance,
        "dtype": dtype,
    }
    parsed_size = _parse_size(size)
    if parsed_size:
        changes["width"], changes["height"] = parsed_size
    changes = {k: v for k, v in changes.items() if v is not None}
    for key, value in (("scheduler", scheduler), ("negative_prompt", negative_prompt)):
        if value is not None:  # '' (or blanks) clears the setting
            changes[key] = value if value.strip() else None
    if not changes and resyntheses is None:
        raise click.UsageError(
            "give at least one setting to change: --steps, --guidance, --size, --scheduler,"
            " --negative-prompt, --dtype or --resyntheses"
        )
    change = open_lab(ctx).set_generator_settings(name, changes=changes, resyntheses=resyntheses)
    if change is None:
        click.echo(f"generator {name}: the settings are already those; nothing changed")
        return
    click.echo(f"generator {name}: {_describe_change(change)}")
    if change.new_settings_hash != change.old_settings_hash:
        click.echo(
            f"settings hash {change.old_settings_hash[:12]} -> {change.new_settings_hash[:12]}:"
            " resyntheses made under the old settings stay stored; queries make new ones"
        )
    if change.new_fingerprint != change.old_fingerprint:
        click.echo(f"fingerprint {change.old_fingerprint[:12]} -> {change.new_fingerprint[:12]}")


def _describe_change(change) -> str:
    """'steps 25 -> 30, K 1 -> 3': each setting that changed, old and new."""
    old, new = json.loads(change.old_settings_json), json.loads(change.new_settings_json)
    parts = []
    if old.get("resyntheses") != new.get("resyntheses"):
        parts.append(f"K {old.get('resyntheses')} -> {new.get('resyntheses')}")
    before, after = old.get("generation") or {}, new.get("generation") or {}
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            parts.append(f"{key} {before.get(key)!r} -> {after.get(key)!r}")
    return ", ".join(parts)
