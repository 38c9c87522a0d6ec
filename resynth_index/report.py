"""A self-contained HTML page of answers: each query beside every candidate's nearest resynthesis.

Images are embedded as base64 PNG thumbnails, so the page can be archived or mailed on its own.
Every piece of text is escaped: captions and metadata come from untrusted files. An answer
made with a calibration (``rsx calibrate``) shows its prediction set in place of the closed-set
note; one that could not use the lab's calibration says why.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from resynth_index.attribution.answer import (
    CLOSED_SET_NOTE,
    SCORE_FOOTNOTE,
    exact_match_note,
    no_evidence_note,
)
from resynth_index.errors import RsxError
from resynth_index.media.images import load_image_bytes

if TYPE_CHECKING:
    from resynth_index.attribution.answer import QueryResult
    from resynth_index.lab import Lab

THUMBNAIL = 224

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
section{border-top:1px solid #ccc;padding:1em 0}
.row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;text-align:center;font-size:.85em}
figure img{display:block;max-width:224px;border:3px solid #ddd}
figure.best img{border-color:#2a7}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;text-align:left}
code{font-size:.8em;color:#555}.verdict{font-size:1.3em;font-weight:bold}
.note{color:#555;font-size:.9em}.warning{color:#a30;font-weight:bold}
"""


# What the page says instead of a thumbnail, by what BlobStore.verify found.
_BLOB_PROBLEMS = {
    "missing": "(image missing from the blob store; run rsx check)",
    "hash mismatch": "(stored image altered: its bytes no longer match their SHA-256;"
    " run rsx check)",
}


def _thumbnail(lab: Lab, sha256: str) -> tuple[str, str | None]:
    """(data URL, None) for an intact blob, else ("", what is wrong with it)."""
    problem = lab.blobs.verify(sha256)
    if problem is not None:
        return "", _BLOB_PROBLEMS.get(problem, f"({problem})")
    try:
        loaded = load_image_bytes(lab.blobs.read(sha256), sha256[:12], lab.settings.max_pixels)
    except RsxError as error:
        return "", f"(stored image unreadable: {error})"
    image = loaded.image.copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None


def _figure(thumbnail: tuple[str, str | None], caption: str, best: bool = False) -> str:
    src, problem = thumbnail
    image = f'<img src="{src}" alt="">' if src else f"<p>{escape(problem or '')}</p>"
    css = ' class="best"' if best else ""
    return f"<figure{css}>{image}<figcaption>{caption}</figcaption></figure>"


def _section(lab: Lab, result: QueryResult) -> str:
    figures = [_figure(_thumbnail(lab, result.sha256), "query")]
    for position, entry in enumerate(result.ranking):
        label = f"{escape(entry.generator)}<br>d = {entry.distance:.4f}"
        figures.append(_figure(_thumbnail(lab, entry.nearest_sha256), label, best=position == 0))
    rows = "".join(
        f"<tr><td>{escape(e.generator)}</td><td>{e.distance:.4f}</td><td>{e.score:.3f}</td>"
        f"<td>{', '.join(f'{d:.4f}' for d in e.distances)}</td>"
        f"<td><code>{escape(result.fingerprints.get(e.generator, '')[:16])}</code></td></tr>"
        for e in result.ranking
    )
    notes = []
    if result.pending:
        notes.append(f"pending imported generators: {escape(', '.join(result.pending))}")
    if result.not_generated:
        notes.append(f"not generated: {escape(', '.join(result.not_generated))}")
    metadata = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(v[:300])}</td></tr>"
        for k, v in sorted(result.metadata.items())
    )
    margin = f" (margin {result.margin:.4f})" if result.margin is not None else ""
    query_id = f" · query {result.query_id}" if result.query_id is not None else ""
    ranking = ""
    if result.ranking:
        ranking = f"""<table><tr><th>generator</th><th>distance</th><th>rel.score</th>
<th>all distances</th><th>fingerprint</th></tr>{rows}</table>
<p class="note">{escape(SCORE_FOOTNOTE)}</p>"""
    threshold = "none" if result.threshold is None else f"{result.threshold:g}"
    return f"""<section>
<h2>{escape(result.image)}{query_id}</h2>
<p class="verdict">verdict: {escape(result.verdict)}{margin}</p>
{_firmness(result)}
<p>caption ({escape(result.caption_source)}): {escape(result.caption)}</p>
<p><code>sha256 {result.sha256}</code></p>
<div class="row">{"".join(figures)}</div>
{ranking}
<p>{escape(result.distance)} distance, {escape(result.aggregation)} over resyntheses; threshold
{threshold}; margin floor {result.margin_floor:g}; embedder
<code>{escape(result.fingerprints.get("embedder", "")[:16])}</code>; generated
{result.generated}, reused {result.reused}. {"; ".join(notes)}</p>
{_generation_block(result)}
{_metadata_block(metadata)}
</section>"""


def _firmness(result: QueryResult) -> str:
    """How firm the verdict is: its reason, the closed-set note, and the warnings it needs."""
    parts = []
    if result.verdict_reason:
        parts.append(f"<p>why: {escape(result.verdict_reason)}</p>")
    parts.extend(_calibration(result))
    parts.extend(_fusion(result))
    if result.prediction_set is None and result.closed_set:
        if CLOSED_SET_NOTE not in result.verdict_reason:
            parts.append(f'<p class="note">{escape(CLOSED_SET_NOTE)}</p>')
    lacking = no_evidence_note(result.verdict, result.without_resynthesis or result.candidates)
    for warning in (exact_match_note(result.exact_match_of), lacking):
        if warning:
            parts.append(f'<p class="warning">{escape(warning)}</p>')
    return "\n".join(parts)


def _calibration(result: QueryResult) -> list[str]:
    """The prediction set of a calibrated answer, what it means and the scores' calibration;
    or why the lab's calibration was not used (nothing without a calibration)."""
    from resynth_index.attribution.calibration.sets import level, set_meaning

    parts = []
    if result.prediction_set is not None and result.coverage is not None:
        members = ", ".join(result.prediction_set) or "none"
        meaning = set_meaning(result.prediction_set, result.coverage)
        parts.append(
            f'<p class="set">prediction set at {escape(level(result.coverage))}:'
            f" <b>{escape(members)}</b> — {escape(meaning)}"
            f" (calibration #{result.calibration_id})</p>"
        )
        parts.append(f'<p class="note">rel.score: {escape(result.score_meaning)}</p>')
    if result.calibration_note:
        parts.append(f'<p class="note">{escape(result.calibration_note)}</p>')
    return parts


def _fusion(result: QueryResult) -> list[str]:
    """A fused answer's weights, where they came from, and its signals per candidate."""
    from resynth_index.attribution.combination import fusion_summary, fusion_table

    fusion = result.fusion
    if not fusion:
        return []
    parts = [f'<p class="set">{escape(fusion_summary(fusion))}</p>']
    if fusion.get("note"):
        parts.append(f'<p class="note">{escape(str(fusion["note"]))}</p>')
    header, *rows = fusion_table(fusion)
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    parts.append(f"<table><tr>{head}</tr>{body}</table>")
    return parts


def _generation_block(result: QueryResult) -> str:
    """What made each candidate's resyntheses, enough to make them again (folded away)."""
    if not result.generation:
        return ""
    rows = []
    for name, record in result.generation.items():
        k = result.resyntheses_per_generator.get(name, "")
        if record.get("imported"):
            cells = '<td colspan="6">imported (made elsewhere; settings unknown to the lab)</td>'
        else:
            seeds = ", ".join(str(seed) for seed in record.get("seeds") or []) or "none"
            values = (
                record.get("steps"),
                record.get("guidance"),
                record.get("size"),
                record.get("scheduler") or "default",
                record.get("dtype"),
                seeds,
            )
            cells = "".join(f"<td>{escape(str(v))}</td>" for v in values)
        rows.append(f"<tr><td>{escape(name)}</td><td>{escape(str(k))}</td>{cells}</tr>")
    head = (
        "<tr><th>generator</th><th>K</th><th>steps</th><th>guidance</th><th>size</th>"
        "<th>scheduler</th><th>dtype</th><th>seeds</th></tr>"
    )
    version = f" by rsx {escape(result.rsx_version)}" if result.rsx_version else ""
    summary = f"how the resyntheses were made{version}"
    return f"<details><summary>{summary}</summary><table>{head}{''.join(rows)}</table></details>"


def _metadata_block(rows: str) -> str:
    if not rows:
        return ""
    summary = "metadata found in the file (evidence, not trusted)"
    return f"<details><summary>{summary}</summary><table>{rows}</table></details>"


def render_report(lab: Lab, results: Sequence[QueryResult]) -> str:
    """The whole report: a header naming the lab by its absolute path (a report outlives the
    folder it was written from: ``lab`` alone would say nothing), then one section per answer."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(_section(lab, r) for r in results)
    count = f"{len(results)} image{'' if len(results) == 1 else 's'}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rsx attribution report</title>
<style>{_STYLE}</style></head><body>
<h1>rsx attribution report</h1>
<p>{count}; lab {escape(str(_absolute(lab.root)))}; written {stamp}</p>
{body}
</body></html>
"""


def _absolute(path: Path) -> Path:
    """``path`` made absolute (links resolved where they can be)."""
    try:
        return Path(path).resolve()
    except OSError:  # a loop of links: absolute is enough
        return Path(path).absolute()


def write_report(lab: Lab, results: Sequence[QueryResult], path: Path) -> None:
    try:
        Path(path).write_text(render_report(lab, results), encoding="utf-8")
    except OSError as error:
        raise RsxError(f"cannot write report {path}: {error.strerror}") from None
