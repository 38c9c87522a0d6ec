"""The web page, rendered on the server: plain HTML, every value escaped.

Captions, file names, metadata and generator names are attacker-controlled text, so everything
that is not a literal of this module goes through ``_e`` (``html.escape`` with quotes). The page
is a thin layer over the JSON API (each view has its twin under ``/v1``); its only script,
``/static/rsx.js``, uploads through the API and polls the job while it works. Without script the
forms still work (the query form posts to ``/query``, which answers with a redirect).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

from resynth_index.service.records import HistoryPage


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _layout(title: str, body: str, *, logout_csrf: str | None = None) -> str:
    """A whole page. ``logout_csrf``: show the log-out button (a cookie login), with its token."""
    logout = ""
    if logout_csrf is not None:
        logout = (
            '<form class="logout" method="post" action="/logout">'
            f'<input type="hidden" name="csrf" value="{_e(logout_csrf)}">'
            '<button type="submit">Log out</button></form>'
        )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} · rsx</title>"
        '<link rel="stylesheet" href="/static/rsx.css">'
        '<script src="/static/rsx.js" defer></script></head><body>'
        '<header><a class="brand" href="/">rsx</a><nav>'
        '<a href="/">Query</a><a href="/history">History</a>'
        f'<a href="/generators">Generators</a></nav>{logout}</header>'
        f"<main>{body}</main></body></html>\n"
    )


def login_page(message: str = "") -> str:
    """The login form (a token makes the cookie the rest of the page rides on)."""
    note = f'<p class="error">{_e(message)}</p>' if message else ""
    body = (
        "<h1>Log in</h1>"
        f"{note}"
        '<form method="post" action="/login" class="login">'
        '<label>Token <input type="password" name="token" autocomplete="current-password"'
        " required autofocus></label>"
        '<button type="submit">Log in</button></form>'
    )
    return _layout("Log in", body)


def query_page(
    candidates: Iterable[str],
    csrf: str,
    *,
    error: str | None = None,
    logout: bool = False,
    checked: Iterable[str] | None = None,
    calibration_note: str | None = None,
) -> str:
    """The query form: an image (chosen or dropped), an optional caption, candidate boxes.

    ``checked``: the boxes ticked at first (None: all); ``records.query_form`` gives the lab's
    default candidates, else its calibrated set, and ``calibration_note`` says which calibrated
    set exists, so a page user can meet the prediction sets ``rsx calibrate`` made.
    """
    names = list(candidates)
    ticked = set(names if checked is None else checked)
    boxes = "".join(
        '<label class="candidate"><input type="checkbox" name="candidate"'
        f' value="{_e(name)}"{" checked" if name in ticked else ""}> {_e(name)}</label>'
        for name in names
    )
    if not boxes:
        boxes = '<p class="note">No active generators: add one with rsx generator add.</p>'
    elif calibration_note:
        boxes += f'<p class="note" id="calibrated">{_e(calibration_note)}</p>'
    hidden = "" if error else " hidden"
    body = (
        "<h1>Who made this image?</h1>"
        f'<p id="error" class="error"{hidden}>{_e(error)}</p>'
        '<form id="query-form" method="post" action="/query" enctype="multipart/form-data">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        '<div id="drop" class="drop"><p>Drop an image here, or choose one:</p>'
        '<input type="file" id="image" name="image" accept="image/*" required>'
        '<img id="preview" alt="the image chosen" hidden></div>'
        '<label class="caption">Caption (optional: else the file\'s own prompt or the'
        ' captioner) <input type="text" id="caption" name="caption" maxlength="4000"></label>'
        f'<fieldset class="candidates"><legend>Candidates</legend>{boxes}</fieldset>'
        '<button type="submit" id="submit">Attribute</button></form>'
        '<div id="progress" class="progress" role="status" hidden>'
        '<progress id="progress-bar"></progress> <span id="stage">queued</span></div>'
    )
    return _layout("Query", body, logout_csrf=csrf if logout else None)


def answer_page(answer: Mapping[str, Any], *, csrf: str = "", logout: bool = False) -> str:
    """One answer: verdict, margin, a bar per generator, the query beside each generator's
    nearest resynthesis, the caption and its source, the metadata (evidence), the audit link."""
    query_id = answer.get("query_id")
    margin = answer.get("margin")
    sha = str(answer.get("sha256", ""))
    rows = []
    for entry in answer.get("ranking") or []:
        score = float(entry.get("score") or 0.0)
        nearest = entry.get("nearest_sha256")
        rows.append(
            '<tr class="generator">'
            f'<th scope="row" class="name">{_e(entry.get("generator"))}</th>'
            f'<td><meter min="0" max="1" value="{score:.4f}"></meter>'
            f' <span class="score">{score:.3f}</span></td>'
            f'<td class="distance">{float(entry.get("distance") or 0):.4f}</td>'
            f'<td class="pair">{_thumb(sha, "the query")}'
            f"{_thumb(nearest, 'its nearest resynthesis')}</td></tr>"
        )
    reason = answer.get("verdict_reason")
    facts = [
        ("image", answer.get("image")),
        ("sha256", sha),
        ("caption", answer.get("caption")),
        ("caption source", answer.get("caption_source")),
        ("generated / reused", f"{answer.get('generated', 0)} / {answer.get('reused', 0)}"),
    ]
    if answer.get("pending"):
        facts.append(("pending (imported)", ", ".join(map(str, answer["pending"]))))
    if answer.get("not_generated"):
        facts.append(("not generated", ", ".join(map(str, answer["not_generated"]))))
    body = (
        f'<h1>Verdict: <span id="verdict">{_e(answer.get("verdict"))}</span></h1>'
        + (f'<p id="reason">{_e(reason)}</p>' if reason else "")
        + '<p>Margin: <span id="margin">'
        + (f"{float(margin):.4f}" if margin is not None else "-")
        + "</span> (second-best minus best distance)</p>"
        '<table class="ranking"><thead><tr><th>generator</th><th>rel. score</th><th>distance</th>'
        "<th>query / nearest resynthesis</th></tr></thead><tbody>"
        + "".join(rows)
        + '</tbody></table><p class="note">score: '
        + _e(answer.get("score_meaning") or "relative among these candidates, not a probability")
        + "</p><h2>Evidence</h2>"
        + _definition_list(facts)
        + '<h2>Metadata in the file</h2><p class="note">Text found in the file: evidence,'
        " never trusted.</p>"
        + (_definition_list(sorted((answer.get("metadata") or {}).items())) or "<p>none</p>")
        + (
            f'<p>Audit record: <a id="audit" href="/v1/queries/{_e(query_id)}?pretty=1">'
            f"query {_e(query_id)} (JSON)</a></p>"
            if query_id is not None
            else ""
        )
    )
    return _layout(f"Answer {query_id}", body, logout_csrf=csrf if logout else None)


def _thumb(sha256: object, alt: str, size: int = 96) -> str:
    """A stored image by its hash (``/v1/images/{sha256}``), linked to itself; ``size`` px."""
    if not sha256:
        return '<span class="thumb missing">-</span>'
    small = "" if size == 96 else " small"
    return (
        f'<a href="/v1/images/{_e(sha256)}"><img class="thumb{small}"'
        f' src="/v1/images/{_e(sha256)}" alt="{_e(alt)}" width="{size}" height="{size}"></a>'
    )


def _definition_list(items: Iterable[tuple[object, object]]) -> str:
    cells = "".join(f"<dt>{_e(key)}</dt><dd>{_e(value)}</dd>" for key, value in items)
    return f"<dl>{cells}</dl>" if cells else ""


def history_page(page: HistoryPage, *, csrf: str = "", logout: bool = False) -> str:
    """A page of the audit history, as ``rsx history`` lists it (id, time, image and its file
    name, verdict, margin, caption), with its search box, verdict filter and paging links."""
    rows = "".join(
        "<tr>"
        f'<td class="id"><a href="/queries/{_e(e["query_id"])}">{_e(e["query_id"])}</a></td>'
        f'<td class="when">{_e(e["created_at"][:19].replace("T", " "))}</td>'
        f'<td class="image"><div>{_thumb(e["sha256"], "the image asked about", 48)}<div>'
        f'<span class="file" title="{_e(e.get("image"))}">{_e(_file_name(e.get("image")))}</span>'
        f'<span class="sha">{_e(e["sha256"][:12])}</span></div></div></td>'
        f'<td class="verdict">{_e(e["verdict"])}</td>'
        f'<td class="margin">{_margin(e.get("margin"))}</td>'
        f"<td>{_e(e['caption'][:120])}</td><td>{_e(e['caption_source'])}</td></tr>"
        for e in page.entries
    )
    links = []
    if page.offset > 0:
        newer = max(page.offset - page.limit, 0)
        links.append(_page_link("Newer", page.q, newer, page.limit, page.verdict))
    if page.offset + page.limit < page.total:
        older = page.offset + page.limit
        links.append(_page_link("Older", page.q, older, page.limit, page.verdict))
    shown = f"{page.offset + 1}-{page.offset + len(page.entries)}" if page.entries else "none"
    body = (
        "<h1>History</h1>"
        '<form method="get" action="/history" class="search">'
        f'<input type="search" name="q" value="{_e(page.q)}"'
        ' placeholder="SHA-256 prefix or caption text">'
        f'<input type="text" name="verdict" id="verdict-filter" value="{_e(page.verdict)}"'
        ' placeholder="verdict (e.g. sd15, unknown)" maxlength="128">'
        '<button type="submit">Search</button></form>'
        f'<p id="count">{_e(shown)} of {page.total}</p>'
        '<table class="history"><thead><tr><th class="id">id</th><th>when (UTC)</th>'
        "<th>image</th><th>verdict</th><th>margin</th><th>caption</th><th>source</th></tr>"
        f'</thead><tbody>{rows}</tbody></table><p class="paging">{" ".join(links)}</p>'
    )
    return _layout("History", body, logout_csrf=csrf if logout else None)


def _file_name(image: object) -> str:
    """The file name of the path an answer was asked about (its last part), "-" without one."""
    text = str(image or "").rstrip("/\\")
    return text.replace("\\", "/").rsplit("/", 1)[-1] or "-"


def _margin(margin: object) -> str:
    """A recorded margin as the answer page shows it ("-" with one candidate)."""
    return "-" if not isinstance(margin, int | float) else f"{float(margin):.4f}"


def _page_link(label: str, q: str, offset: int, limit: int, verdict: str = "") -> str:
    fields: dict[str, object] = {"q": q, "offset": offset, "limit": limit}
    if verdict:
        fields["verdict"] = verdict
    return f'<a href="/history?{_e(urlencode(fields))}">{_e(label)}</a>'


def generators_page(listing: Mapping[str, Any], *, csrf: str = "", logout: bool = False) -> str:
    """Active and retired generators, pending work orders, the work-order CSV download."""
    sections = []
    for status, title in (("active", "Active"), ("retired", "Retired")):
        rows = "".join(
            f'<tr><td class="name">{_e(g["name"])}</td><td>{_e(g["kind"])}</td>'
            f'<td class="sha">{_e(g["fingerprint"][:12])}</td><td>{_e(g["source"] or "-")}</td>'
            f"<td>{_e(g['added_at'][:19].replace('T', ' '))}</td></tr>"
            for g in listing["generators"]
            if g["status"] == status
        )
        sections.append(
            f"<h2>{title}</h2>"
            + (
                f'<table class="generators" id="{status}"><thead><tr><th>name</th><th>kind</th>'
                "<th>fingerprint</th><th>model files</th><th>added (UTC)</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>"
                if rows
                else "<p>none</p>"
            )
        )
    orders = "".join(
        f'<tr><td>{_e(o["generator"])}</td><td class="sha">{_e(o["caption_hash"][:12])}</td>'
        f"<td>{_e(o['caption'])}</td></tr>"
        for o in listing["pending"]
    )
    sections.append(
        "<h2>Pending work orders</h2><p>Captions queries needed that imported generators still"
        " lack: produce the images, fill in <code>path</code>, and <code>rsx ingest</code> the"
        " CSV.</p>"
        + (
            '<table class="orders"><thead><tr><th>generator</th><th>caption hash</th>'
            f"<th>caption</th></tr></thead><tbody>{orders}</tbody></table>"
            if orders
            else "<p>none</p>"
        )
        + '<p><a class="button" id="export" href="/v1/work-orders.csv" download>'
        "Download the work-order CSV</a></p>"
    )
    return _layout(
        "Generators",
        "<h1>Generators</h1>" + "".join(sections),
        logout_csrf=csrf if logout else None,
    )
