"""Answers rendered for people on a terminal: the verdict and why, the ranking table, the notes.

The table says how firm an answer is: the reason for its verdict, the candidates an inconclusive
answer could not tell apart, the threshold and margin floor applied, and, without a threshold,
that the source may be none of the candidates. ``rel.score`` is relative among the candidates
asked (one candidate alone scores 1.000), and the table says so under it. With a calibration
(``rsx calibrate``) the answer shows its prediction set in place of the closed-set note, and
the scores use the calibration's fitted temperature; an answer that could not use the lab's
calibration says why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resynth_index.attribution.answer import (
    CLOSED_SET_NOTE,
    SCORE_FOOTNOTE,
    exact_match_note,
    no_evidence_note,
)

if TYPE_CHECKING:
    from resynth_index.attribution.answer import QueryResult


def generation_summary(record: dict[str, Any]) -> str:
    """One generator's generation record (``QueryResult.generation``) in a few words."""
    if record.get("imported"):
        return "imported (made elsewhere; settings unknown to the lab)"
    seeds = record.get("seeds") or []
    parts = [
        f"{record.get('steps')} steps",
        f"guidance {record.get('guidance')}",
        str(record.get("size")),
        str(record.get("dtype")),
        f"scheduler {record.get('scheduler') or 'default'}",
        f"seeds {','.join(map(str, seeds)) or 'none'}",
    ]
    return ", ".join(parts)


def calibration_lines(result: QueryResult) -> list[str]:
    """The prediction set of a calibrated answer (with what it means, unless the verdict's
    reason already says it), or why the lab's calibration was not used; nothing otherwise."""
    from resynth_index.attribution.calibration.sets import level, set_meaning

    lines = []
    if result.prediction_set is not None and result.coverage is not None:
        members = ", ".join(result.prediction_set) or "none"
        lines.append(
            f"prediction set at {level(result.coverage)} (calibration #{result.calibration_id}):"
            f" {members}"
        )
        meaning = set_meaning(result.prediction_set, result.coverage)
        if meaning not in result.verdict_reason:
            lines.append(f"the set: {meaning}")
    if result.calibration_note:
        lines.append(result.calibration_note)
    return lines


def fusion_lines(result: QueryResult) -> list[str]:
    """A fused answer's weights (and where they came from) and its signals per candidate;
    nothing for a resynthesis answer."""
    from resynth_index.attribution.combination import fusion_summary, fusion_table

    fusion = result.fusion
    if not fusion:
        return []
    lines = [fusion_summary(fusion)]
    if fusion.get("note"):
        lines.append(str(fusion["note"]))
    table = fusion_table(fusion)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return lines


EVIDENCE_ITEMS = 4  # metadata entries shown in the table; --json and the report have them all
EVIDENCE_CHARS = 40


def evidence_line(metadata: dict[str, str]) -> str | None:
    """The file's own metadata (software, model names, prompts) in one short line, or None.

    It is evidence an analyst should see next to the verdict, never trusted: any tool can write
    any text there.
    """
    if not metadata:
        return None
    shown = []
    for key, value in sorted(metadata.items())[:EVIDENCE_ITEMS]:
        text = " ".join(str(value).split())
        if len(text) > EVIDENCE_CHARS:
            text = text[: EVIDENCE_CHARS - 3] + "..."
        shown.append(f"{key}: {text}")
    more = len(metadata) - len(shown)
    tail = f" (+{more} more in --json)" if more > 0 else ""
    return "evidence in the file (not trusted): " + "; ".join(shown) + tail


def render_answer(result: QueryResult) -> str:
    """One answer as the terminal table people read (``--json`` gives the machine form)."""
    query_id = f"  query {result.query_id}" if result.query_id is not None else ""
    margin = f"  (margin {result.margin:.4f})" if result.margin is not None else ""
    lines = [
        f"{result.image}  sha256 {result.sha256[:12]}{query_id}",
        f"  caption ({result.caption_source}): {result.caption[:100]}",
        f"  verdict: {result.verdict}{margin}",
    ]
    evidence = evidence_line(result.metadata)
    if evidence:
        lines.insert(2, f"  {evidence}")
    if result.verdict_reason:
        lines.append(f"  why: {result.verdict_reason}")
    lines.extend(f"  {line}" for line in calibration_lines(result))
    lines.extend(f"  {line}" for line in fusion_lines(result))
    if result.prediction_set is None and result.closed_set:
        if CLOSED_SET_NOTE not in result.verdict_reason:
            lines.append(f"  {CLOSED_SET_NOTE}")
    warning = exact_match_note(result.exact_match_of)
    if warning:
        lines.append(f"  WARNING: {warning}")
    lacking = no_evidence_note(result.verdict, result.without_resynthesis or result.candidates)
    if lacking:
        lines.append(f"  {lacking}")
    if result.ranking:
        lines.append(f"  {'generator':<20} {'distance':>9} {'rel.score':>9}  resyntheses")
        for entry in result.ranking:
            lines.append(
                f"  {entry.generator:<20} {entry.distance:>9.4f} {entry.score:>9.3f}  "
                f"{len(entry.distances)}"
            )
        footnote = SCORE_FOOTNOTE
        if result.calibration_id is not None:  # the scores use the calibration's temperature
            footnote = f"rel.score: {result.score_meaning}"
        lines.append(f"  {footnote}")
    threshold = "none" if result.threshold is None else f"{result.threshold:g}"
    lines.append(
        f"  threshold {threshold}; margin floor {result.margin_floor:g};"
        f" {result.distance} distance, {result.aggregation} over resyntheses"
    )
    extra = [f"generated {result.generated}", f"reused {result.reused}"]
    if result.pending:
        extra.append(f"pending (imported, no resynthesis yet): {', '.join(result.pending)}")
    if result.not_generated:
        extra.append(f"not generated (--no-generate): {', '.join(result.not_generated)}")
    lines.append("  " + "; ".join(extra))
    for name, record in result.generation.items():
        k = result.resyntheses_per_generator.get(name)
        lines.append(f"  made by {name} (K {k}): {generation_summary(record)}")
    if result.rsx_version:
        lines.append(f"  rsx {result.rsx_version}")
    return "\n".join(lines)
