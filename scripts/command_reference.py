"""Write the documentation's command reference (docs/commands.md) from the click commands.

Every command's ``--help``, as ``rsx`` prints it, in the order of the command tree: the page
cannot drift from the code, and ``tests/test_docs.py`` fails when it does.

    python scripts/command_reference.py            # rewrite docs/commands.md
    python scripts/command_reference.py --check    # exit 1 when docs/commands.md is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

PAGE = Path(__file__).resolve().parents[1] / "docs" / "commands.md"
WIDTH = 100

INTRODUCTION = """\
# Command reference

Every command's `--help`, generated from the commands themselves by
`python scripts/command_reference.py` (a test fails when this page and the code disagree).
`--lab` and `--device` go before the command: `rsx --lab ./lab query image.png`.
"""


def _walk(
    command: click.Command, path: list[str], parent: click.Context | None = None
) -> list[tuple[list[str], click.Context]]:
    """Every command under ``command`` (itself first), with the words that name it, each in
    the context ``rsx`` gives it (its parents' settings, such as ``-h`` for help)."""
    context = command.make_context(
        " ".join(path), [], parent=parent, resilient_parsing=True,
        terminal_width=WIDTH, max_content_width=WIDTH,
    )  # fmt: skip
    found = [(path, context)]
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            sub = command.commands[name]
            if not sub.hidden:
                found += _walk(sub, [*path, name], context)
    return found


def render() -> str:
    """The whole page."""
    from resynth_index.cli import cli

    sections = [INTRODUCTION]
    for path, context in _walk(cli, ["rsx"]):
        title = " ".join(path)
        level = "##" if len(path) <= 2 else "###"
        text = context.command.get_help(context).rstrip()
        sections.append(f"{level} `{title}`\n\n```text\n{text}\n```\n")
    return "\n".join(sections)


def main(argv: list[str]) -> int:
    page = render()
    if "--check" in argv:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != page:
            print(f"{PAGE} is stale: run python scripts/command_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
