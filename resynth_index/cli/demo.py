"""`rsx demo`: the toy zoo end to end."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from resynth_index.cli.app import cli


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the demo writes its query images and report (default: inside the lab).",
)
@click.pass_context
def demo(ctx, out: Path | None) -> None:
    """Build a toy lab, attribute toy images of known source, print the accuracy.

    Uses only tiny models built in-process: nothing is downloaded. Re-running reuses the lab.
    Without --lab the demo uses its own directory, never your $RSX_LAB.

    \b
    Examples:
      rsx demo
      rsx --lab /tmp/rsx-demo demo
    """
    from resynth_index.config import default_lab_dir
    from resynth_index.demo import run_demo

    lab_dir = ctx.obj["lab_flag"] or default_lab_dir().with_name("demo-lab")
    accuracy = run_demo(lab_dir, out=out, echo=click.echo)
    if accuracy < 1.0:
        click.echo("note: not every toy image was attributed correctly", err=True)
    click.echo(f"open it in the web service: rsx --lab {shlex.quote(str(lab_dir))} serve")
