"""`rsx demo`: the toy zoo end to end.

The first run builds the toy lab and generates for about a minute: on a terminal a status line
shows each step (building the toy generators, making the query images, then the queries'
reading, generation per generator and embedding), as ``rsx query`` shows its own.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import click

from resynth_index.cli.app import StatusLine, cli
from resynth_index.cli.generation import GenerationProgress


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
    Without --lab the demo uses its own directory, never your $RSX_LAB. The last line says
    how to open the lab in the web service ('rsx serve', which needs the [serve] extra).

    \b
    Examples:
      rsx demo
      rsx --lab /tmp/rsx-demo demo
    """
    from resynth_index.config import demo_lab_dir
    from resynth_index.demo import run_demo, serve_line

    lab_dir = ctx.obj["lab_flag"] or demo_lab_dir()
    status = StatusLine()
    with status:
        accuracy = run_demo(
            lab_dir, out=out, echo=partial(_echo, status), progress=GenerationProgress(status)
        )
    if accuracy < 1.0:
        click.echo("note: not every toy image was attributed correctly", err=True)
    click.echo(serve_line(lab_dir))


def _echo(status: StatusLine, line: str) -> None:
    """A line of the demo's output, the status line cleared first so it never lands mid-line."""
    status.clear()
    click.echo(line)
