"""Answers rendered for people on a terminal: the verdict, the ranking table, the notes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resynth_index.pipeline.query import QueryResult


def render_answer(result: QueryResult) -> str:
    """One answer as the terminal table people read (``--json`` gives the machine form)."""
    lines = [
        f"{result.image}  sha256 {result.sha256[:12]}",
        f"  caption ({result.caption_source}): {result.caption[:100]}",
        f"  verdict: {result.verdict}"
        + (f"  (margin {result.margin:.4f})" if result.margin is not None else ""),
        f"  {'generator':<20} {'distance':>9} {'score':>7}  resyntheses",
    ]
    for entry in result.ranking:
        lines.append(
            f"  {entry.generator:<20} {entry.distance:>9.4f} {entry.score:>7.3f}  "
            f"{len(entry.distances)}"
        )
    extra = [f"generated {result.generated}", f"reused {result.reused}"]
    if result.pending:
        extra.append(f"pending (imported, no resynthesis yet): {', '.join(result.pending)}")
    if result.not_generated:
        extra.append(f"not generated (--no-generate): {', '.join(result.not_generated)}")
    lines.append("  " + "; ".join(extra))
    return "\n".join(lines)
