"""The ``rsx`` group, its global options, and what every command shares: one-line errors,
opening the lab, a progress bar and a status line that only show on a terminal."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

import click

from resynth_index import __version__
from resynth_index.config import LAB_ENV, resolve_lab_dir
from resynth_index.errors import RsxError
from resynth_index.models.devices import DEVICE_CHOICES


class RsxGroup(click.Group):
    """Turns every RsxError into one clear line and exit status 1, never a traceback; a global
    option given after the command (``rsx query --lab X``) gets a hint where it goes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RsxError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:  # a disk that is full or read-only, a folder that vanished
            raise click.ClickException(one_line(_os_failure(error))) from None
        except click.NoSuchOption as error:
            if error.option_name in _GLOBAL_OPTIONS and _GLOBAL_HINT not in error.message:
                command = error.ctx.command_path.split()[1:] if error.ctx else ["COMMAND"]
                hint = f" ({_GLOBAL_HINT}: rsx {error.option_name} X {' '.join(command)} ...)"
                raise click.NoSuchOption(
                    error.option_name, error.message + hint, error.possibilities, error.ctx
                ) from None
            raise
        except Exception as error:
            # the database failed in the middle of a command (a server stopped, a corrupt or
            # read-only file, a full disk): one line, never a traceback with SQL and parameters
            where = _database_of(ctx, error)
            if where is None:
                raise
            from resynth_index.store.engine import database_failure

            raise click.ClickException(one_line(database_failure(error, where))) from None


def one_line(message: str) -> str:
    """A message as the single line a failure gets on stderr."""
    return " ".join(message.split()) or "failed"


def _os_failure(error: OSError) -> str:
    """An operating-system failure in words: what failed, on which file, and why."""
    why = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename else ""
    return f"cannot go on: {why}{where}; what was stored before is kept"


def _database_of(ctx: click.Context, error: Exception) -> str | None:
    """How to name the lab's database in a message about ``error``, when ``error`` is a failure
    of the database (SQLAlchemy's or a driver's); None for any other error, which is a bug and
    keeps its traceback."""
    from sqlalchemy.exc import DBAPIError

    if not isinstance(error, DBAPIError) and not _driver_error(error):
        return None
    lab = (ctx.obj or {}).get("lab")
    if lab is not None:
        from resynth_index.store.engine import database_name

        return database_name(lab.engine)
    return str((ctx.obj or {}).get("lab_dir", "of this lab"))


def _driver_error(error: Exception) -> bool:
    """Whether ``error`` is a database driver's own (sqlite3's or psycopg's), raised where no
    SQLAlchemy wrapper caught it."""
    import sqlite3

    if isinstance(error, sqlite3.Error):
        return True
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(error, psycopg.Error)


_GLOBAL_OPTIONS = ("--lab", "--device")
_GLOBAL_HINT = "--lab and --device go before the command"


@click.group(cls=RsxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--lab",
    "lab_dir",
    type=click.Path(path_type=Path),
    help=f"Lab directory (default: ${LAB_ENV}, else a per-user data directory).",
)
@click.option(
    "--device",
    type=click.Choice(DEVICE_CHOICES),
    default=None,
    help="Where models run (default: the lab's setting, 'auto').",
)
@click.version_option(__version__, prog_name="rsx")
@click.pass_context
def cli(ctx: click.Context, lab_dir: Path | None, device: str | None) -> None:
    """Attribute AI-generated images to their source generator by resynthesis.

    \b
    Quick start (toy models, no downloads):
      rsx demo
    A lab of your own:
      rsx --lab ./lab init --embedder ViT-L-14-336@/models/clip.safetensors --layer 12
      rsx --lab ./lab generator add sd15 --diffusers /models/sd15
      rsx --lab ./lab generator add midjourney --imported
      rsx --lab ./lab query suspect.png --caption "a portrait of an old man"
    """
    ctx.obj = {"lab_dir": resolve_lab_dir(lab_dir), "lab_flag": lab_dir, "device": device}


def open_lab(ctx: click.Context):
    """The lab the command works on; remembered so a failure of its database names it."""
    from resynth_index.lab import Lab

    lab = Lab.open(ctx.obj["lab_dir"], device=ctx.obj["device"])
    ctx.obj["lab"] = lab
    return lab


def progress_bar(label: str, total: int):
    """A progress bar on a terminal, nothing otherwise (logs stay clean)."""
    if not sys.stderr.isatty() or total <= 1:
        return None
    return click.progressbar(length=total, label=label, file=sys.stderr)


class StatusLine:
    """One line of progress on stderr, rewritten in place; silent unless stderr is a terminal.

    Other messages clear it first (``clear``), so a one-line message never lands mid-status.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.enabled = bool(self.stream.isatty())
        except (AttributeError, ValueError):  # a closed or unusual stream: stay silent
            self.enabled = False
        self.shown = False

    def show(self, text: str) -> None:
        """Replace the status with ``text`` (cut to the terminal's width)."""
        if not self.enabled:
            return
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r\x1b[K" + text[: max(width - 1, 10)])
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        """Remove the status line, leaving the cursor at the start of an empty line."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()


def main() -> None:
    cli(prog_name="rsx")
