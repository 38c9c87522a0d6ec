"""`rsx history` and `rsx show`: the audit trail of past answers, read back from the command line.

Every ``rsx query`` answer is recorded (the ``queries`` table, ``store/audit.py``) together with
the answer exactly as it was reported. ``rsx history`` lists those records, newest first;
``rsx show`` re-renders one of them from what was stored, never recomputed: its JSON byte for
byte as ``rsx query --json`` printed it, its terminal table, or an HTML report.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from resynth_index.cli.app import cli, open_lab

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from resynth_index.store.audit import AuditEntry

#: How many characters of a caption the history table shows.
CAPTION_WIDTH = 40
#: How many characters of an image's SHA-256 the history table shows.
SHA_WIDTH = 12

_HEX_PREFIX = re.compile(r"[0-9a-fA-F]{6,64}")


@cli.command()
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Records to list.",
)
@click.option(
    "--offset",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Newest records to skip first (for the next page).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record and line.")
@click.option(
    "--image",
    metavar="SHA|PATH",
    help="Only this image: a SHA-256 prefix (6+ hex digits) or a file (hashed; a file wins).",
)
@click.option("--verdict", metavar="G", help="Only answers with this verdict (e.g. sd15, unknown).")
@click.option("--caption", metavar="TEXT", help="Only captions holding TEXT (any case).")
@click.pass_context
def history(
    ctx: click.Context,
    limit: int,
    offset: int,
    as_json: bool,
    image: str | None,
    verdict: str | None,
    caption: str | None,
) -> None:
    """List past answers (the audit records), newest first.

    Each line: the query id ('rsx show ID' re-renders it), when it was answered (UTC), the
    image's SHA-256 (shortened), the verdict, the caption (shortened) and the image path given.

    \b
    Examples:
      rsx history
      rsx history --limit 50 --offset 50            # the next page
      rsx history --image suspect.png               # every answer about this file
      rsx history --image 3f2a9c1b --verdict unknown --json
      rsx history --caption lighthouse
    """
    from resynth_index.store import audit

    criteria = audit.HistoryFilter(
        sha256_prefix=_image_prefix(image) if image is not None else None,
        verdict=verdict,
        caption_contains=caption or None,
    )
    lab = open_lab(ctx)
    with lab.session() as session:
        entries = audit.query_history(session, criteria, limit=limit, offset=offset)
        total = audit.count_query_history(session, criteria)
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry.as_json(), sort_keys=True))
        return
    filtered = criteria != audit.HistoryFilter()
    if not entries:
        if total and offset:
            click.echo(f"no records past the first {offset}: {_matching(total, filtered)}")
        else:
            click.echo("no queries match" if filtered else "no queries recorded yet")
        return
    for line in _table(entries):
        click.echo(line)
    shown = f"{offset + 1}-{offset + len(entries)}"
    more = f"; --offset {offset + len(entries)} for more" if offset + len(entries) < total else ""
    click.echo(f"{shown} of {_matching(total, filtered)}{more}")


@cli.command()
@click.argument("query_id", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="The answer as recorded (as query printed).")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the answer as a self-contained HTML report.",
)
@click.option("--force", is_flag=True, help="Replace the --report file if it exists.")
@click.pass_context
def show(
    ctx: click.Context, query_id: int | None, as_json: bool, report: Path | None, force: bool
) -> None:
    """Re-render a past answer exactly as it was recorded (nothing is recomputed).

    QUERY_ID is the answer's id: 'rsx query' reports it, 'rsx history' lists them; without
    it, the latest answer is shown. The terminal table is the one 'rsx query' printed; --json
    prints the answer byte for byte as 'rsx query --json' did; --report writes the HTML report
    of it.

    \b
    Examples:
      rsx show                                      # the latest answer
      rsx show 42
      rsx show 42 --json
      rsx show 42 --report answer-42.html
      rsx show 42 --report answer-42.html --force    # replace an earlier report
    """
    if as_json and report is not None:
        raise click.ClickException("--json and --report do not go together: pick one")
    if force and report is None:
        raise click.ClickException("--force only goes with --report")
    if report is not None:
        _check_report_target(report, force)
    from resynth_index.errors import RsxError
    from resynth_index.store import audit

    lab = open_lab(ctx)
    with lab.session() as session:
        if query_id is None:
            query_id = _latest_query(session)
        stored = audit.recorded_answer(session, query_id) if query_id > 0 else None
    if stored is None:
        raise click.ClickException(f"no query {query_id} in this lab; 'rsx history' lists them")
    if as_json:
        click.echo(stored)
        return
    from resynth_index.attribution.answer import QueryResult

    try:
        result = QueryResult.from_json(json.loads(stored))
    except (ValueError, TypeError, RsxError) as error:
        raise click.ClickException(
            f"query {query_id}'s recorded answer cannot be read: {error}"
        ) from None
    if report is None:
        from resynth_index.cli.render import render_answer

        click.echo(render_answer(result))
        return
    from resynth_index.report import write_report

    write_report(lab, [result], report)
    click.echo(f"report written to {report}")


def _latest_query(session: Session) -> int:
    """The id of the newest audit record; refused in one line when none is recorded."""
    from resynth_index.store import audit

    newest = audit.query_history(session, limit=1)
    if not newest:
        raise click.ClickException(
            "no queries recorded yet in this lab: 'rsx query IMAGE' answers one"
        )
    return newest[0].query_id


def _image_prefix(value: str) -> str:
    """--image as a SHA-256 prefix: a file's own digest, or the hex digits given."""
    from resynth_index.hashing import hash_file

    path = Path(value).expanduser()
    if path.is_file():
        try:
            return hash_file(path)
        except OSError as error:
            raise click.ClickException(
                f"cannot read --image {value}: {error.strerror or error}"
            ) from None
    if _HEX_PREFIX.fullmatch(value):
        return value.lower()
    what = "is a folder" if path.is_dir() else "no such file"
    raise click.ClickException(
        f"--image {value}: {what}, nor a SHA-256 prefix (at least 6 hex digits)"
    )


def _check_report_target(report: Path, force: bool) -> None:
    """Refuse, before any work, a report path that cannot be written or would replace a file."""
    folder = report.parent
    if not folder.is_dir():
        raise click.ClickException(
            f"cannot write the report {report}: folder {folder} does not exist"
        )
    if report.is_dir():
        raise click.ClickException(f"cannot write the report {report}: it is a folder")
    if (report.exists() or report.is_symlink()) and not force:
        raise click.ClickException(f"report {report} already exists; pass --force to replace it")


def _table(entries: list[AuditEntry]) -> list[str]:
    """The history table: a header, then one line per record."""
    id_width = max(len("id"), *(len(str(e.query_id)) for e in entries))
    verdict_width = min(24, max(len("verdict"), *(len(e.verdict) for e in entries)))
    lines = [
        f"{'id':>{id_width}}  {'time (UTC)':<19}  {'sha256':<{SHA_WIDTH}}  "
        f"{'verdict':<{verdict_width}}  {'caption':<{CAPTION_WIDTH}}  image"
    ]
    for entry in entries:
        lines.append(
            f"{entry.query_id:>{id_width}}  {_when(entry.created_at)}  "
            f"{entry.image_sha256[:SHA_WIDTH]:<{SHA_WIDTH}}  "
            f"{_shorten(entry.verdict, verdict_width):<{verdict_width}}  "
            f"{_shorten(entry.caption, CAPTION_WIDTH):<{CAPTION_WIDTH}}  {entry.image_path}"
        )
    return lines


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _shorten(text: str, width: int) -> str:
    """One line of at most ``width`` characters ("..." marks a cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _matching(total: int, filtered: bool) -> str:
    noun = "record" if total == 1 else "records"
    return f"{total} matching {noun}" if filtered else f"{total} {noun}"
