"""`rsx index sync`: bring the vector index file up to date with the database, on demand.

Queries never write the index (opening it costs O(N): it is read, hashed and maybe rewritten
whole), so the embeddings they store wait for the next sync: an ingest, a resynthesis run, an
idle `rsx serve`, or this command, which a cron job or a script can run after a burst of queries.
"""

from __future__ import annotations

import click

from resynth_index.cli.app import RsxGroup, cli, open_lab


@cli.group(cls=RsxGroup)
def index() -> None:
    """Maintain the vector index file (derived from the database, rebuilt when unusable)."""


@index.command()
@click.pass_context
def sync(ctx: click.Context) -> None:
    """Add the embeddings stored since the index file was last synced, and save it.

    A missing, damaged or foreign index file is rebuilt from the database. Queries read what the
    index lacks from the database, so syncing is never needed for a correct answer; it keeps the
    file current for `rsx serve` and `rsx check`.

    \b
    Examples:
      rsx --lab ./lab index sync
    """
    with open_lab(ctx) as lab:
        name = lab.index_path.name
        report = lab.sync_index()
    if report.rebuilt:
        click.echo(f"index {name}: rebuilt from the database, {report.count} vector(s)")
    elif report.added:
        click.echo(f"index {name}: added {report.added} vector(s), {report.count} in all")
    else:
        click.echo(f"index {name}: up to date, {report.count} vector(s)")
