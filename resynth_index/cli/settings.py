"""`rsx config get|set|history`: the lab settings that may change after it is created.

Each change is recorded in settings.json with its time (``changes``), so an answer can be read
against the settings in force when it was made; the file is written atomically. A refused value
changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

import click

from resynth_index.cli.app import cli
from resynth_index.config import CHANGEABLE, LabSettings, parse_setting


def _shown(value: Any) -> str:
    """A setting's value as ``rsx config`` prints it (and as ``set`` would take it back)."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def _settings(ctx: click.Context) -> LabSettings:
    """The lab's settings, read without opening its database or models (fast; read-only)."""
    from resynth_index.errors import StoreError

    lab_dir = ctx.obj["lab_dir"]
    if not lab_dir.is_dir():
        raise StoreError(f"no lab at {lab_dir}; create one with 'rsx init'")
    return LabSettings.load(lab_dir)


@cli.group("config")
def config_group() -> None:
    """Show or change the lab's settings; every change is recorded with its time.

    \b
    Examples:
      rsx config get                          # every changeable setting
      rsx config get threshold
      rsx config set threshold 0.35           # beyond it the verdict is 'unknown'
      rsx config set threshold none           # closed set again
      rsx config set margin_floor 0.004
      rsx config set default_candidates sd15,sdxl,midjourney
      rsx config history
    """


@config_group.command("get")
@click.argument("key", required=False, type=click.Choice(list(CHANGEABLE)), metavar="[KEY]")
@click.option("--json", "as_json", is_flag=True, help="One JSON object of key: value.")
@click.pass_context
def config_get(ctx: click.Context, key: str | None, as_json: bool) -> None:
    """Print one setting, or every setting that may change.

    \b
    Examples:
      rsx config get
      rsx config get margin_floor
      rsx config get --json
    """
    settings = _settings(ctx)
    keys = [key] if key else list(CHANGEABLE)
    values = {name: settings.get(name) for name in keys}
    if as_json:
        click.echo(json.dumps(values, sort_keys=True))
    elif key:
        click.echo(_shown(values[key]))
    else:
        for name, value in values.items():
            click.echo(f"{name} = {_shown(value)}")


@config_group.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("key", type=click.Choice(list(CHANGEABLE)), metavar="KEY")
@click.argument("value")
@click.pass_context
def config_set(ctx: click.Context, key: str, value: str) -> None:
    """Change one setting (checked first: a refused value changes nothing).

    \b
    KEY and VALUE:
      threshold             a distance (>= 0), or none: beyond it the verdict is 'unknown'
      margin_floor          a distance (>= 0): a closer second makes it 'inconclusive'
      default_candidates    active generator names, comma-separated, or none (all active)
      captioner             a local transformers image-to-text folder, or none
      default_resyntheses   K for generators added from now on (>= 1)
      generation_batch_size a whole number >= 1, or auto (the default: 16 for SD1.5 at
                            512 px on CUDA, scaled by image size and fitted to free memory;
                            4 on a CPU)
      embedding_batch_size, max_pixels   whole numbers >= 1

    \b
    Examples:
      rsx config set threshold 0.35
      rsx config set default_candidates sd15,midjourney
      rsx config set captioner /models/blip-large
      rsx config set threshold none
      rsx config set generation_batch_size auto
    """
    settings = _settings(ctx)
    names: list[str] = []
    if key == "default_candidates" and value.strip().lower() != "none":
        from resynth_index.cli.app import open_lab

        with open_lab(ctx) as lab:
            names = [row.name for row in lab.generators()]
    parsed = parse_setting(key, value, generators=names)
    change = settings.change(key, parsed)
    if change is None:
        click.echo(f"{key} is already {_shown(parsed)}; nothing changed")
        return
    settings.save(ctx.obj["lab_dir"])
    click.echo(f"{key}: {_shown(change['old'])} -> {_shown(change['new'])}")


@config_group.command("history")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per change.")
@click.pass_context
def config_history(ctx: click.Context, as_json: bool) -> None:
    """List every recorded settings change, oldest first.

    \b
    Examples:
      rsx config history
      rsx config history --json
    """
    changes = _settings(ctx).changes
    for change in changes:
        if as_json:
            click.echo(json.dumps(change, sort_keys=True))
        else:
            click.echo(
                f"{change.get('at')}  {change.get('key')}: {_shown(change.get('old'))}"
                f" -> {_shown(change.get('new'))}"
            )
    if not changes and not as_json:
        click.echo("no settings changed since the lab was created")
