"""What the commands that generate share (``rsx query``, ``rsx calibrate``, ``rsx demo``): the
status line of long work, the planning line said before anything is generated, and the cap on
what one call generates without ``--yes``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from resynth_index.cli.app import StatusLine

if TYPE_CHECKING:
    from resynth_index.pipeline.plans import PlannedGenerations, ProgressEvent

#: More generations than this in one call need ``--yes`` (a typo in --resyntheses or a folder
#: of thousands of uncaptioned images must not start hours of work unasked).
GENERATION_CAP = 1000


class GenerationProgress:
    """Shows the pipeline's progress events on the status line and counts what was stored."""

    def __init__(self, status: StatusLine) -> None:
        self.status = status
        self._stored: dict[str, int] = {}  # generator -> resyntheses committed in this call

    @property
    def stored(self) -> int:
        """Resyntheses committed so far in this call (each event follows a batch's commit)."""
        return sum(self._stored.values())

    def kept(self) -> str:
        """``"3 resyntheses stored"``: what an interrupted call says it kept."""
        return f"{self.stored} resynthes{'is' if self.stored == 1 else 'es'} stored"

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage == "generate" and event.generator is not None:
            self._stored[event.generator] = event.done
            text = f"{event.generator}: generating {event.done} of {event.total}"
        elif event.stage == "load":
            text = f"loading and captioning images: {event.done} of {event.total}"
        elif event.stage == "embed":
            text = f"embedding: {event.done} of {event.total} images"
        else:
            text = f"{event.stage}: {event.done} of {event.total}"
        self.status.show(text)


def announce_plan(
    status: StatusLine, yes: bool, planned: PlannedGenerations, *, what: str, smaller: str
) -> None:
    """Say what will be generated; refuse more than ``GENERATION_CAP`` without ``--yes``.

    ``what`` names the call ("a query"), ``smaller`` how to ask for less ("lower --resyntheses
    or --candidates"). Called by the pipeline before anything is stored, so a refusal leaves
    nothing written.
    """
    if planned.total <= 0:
        return
    status.clear()
    click.echo(f"planning {describe_plan(planned)}", err=True)
    if planned.total > GENERATION_CAP and not yes:
        raise click.ClickException(
            f"{planned.total} generations is more than the {GENERATION_CAP} {what} makes"
            f" without asking; pass --yes to go ahead, or {smaller}"
        )


def describe_plan(planned: PlannedGenerations) -> str:
    """``12 generations (2 generators x 3 resyntheses x 2 captions)``, and what is reused."""
    counts = sorted(set(planned.resyntheses.values()))
    per = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    parts = [
        _plural(len(planned.generators), "generator", "generators"),
        f"{per} {'resynthesis' if per == '1' else 'resyntheses'}",
        _plural(planned.captions, "caption", "captions"),
    ]
    text = f"{_plural(planned.total, 'generation', 'generations')} ({' x '.join(parts)}"
    if planned.stored:
        text += f", less {planned.stored} already stored"
    return text + ")"


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"
