"""What the service answers and how it reads what it is sent: JSON bodies and one-line errors in
the words of the web (form fields, not command-line flags; no path of the server), and the
numbers a form or a URL carries, parsed strictly (ASCII digits, bounded length)."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.responses import Response

#: Command-line flags in messages the pipeline shares with the CLI -> the form field meant.
_FIELDS = {
    "--candidates": "the candidates field",
    "--resyntheses": "the resyntheses field",
    "--caption": "the caption field",
    "--method": "the method field",
    "--no-generate": "generate=0",
    "--fusion-layers": "the fusion layers",
}
_FLAG = re.compile(r"--[a-z][a-z-]*")
#: An absolute path of this machine: a slash, then characters up to a space, quote or bracket.
_PATH = re.compile(r"(?<![\w/:.])/(?:[^\s'\"()\[\],;]+)")


class BadField(Exception):
    """A field or parameter that cannot be used: ``status`` and one line naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None, *, pretty: bool = False
) -> Response:
    """JSON as ``rsx query --json`` writes it (``json.dumps(..., sort_keys=True)``); indented
    for people when ``pretty``."""
    body = json.dumps(data, sort_keys=True, indent=2 if pretty else None)
    return Response(body, status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """``{"error": "one line"}``, in the web's words (see ``public_message``)."""
    return json_response({"error": public_message(message)}, status, headers)


def public_message(message: str) -> str:
    """A message fit for a client: one line, command-line flags named as the form fields they
    are on the web, and no path of the server's disks (a client learns nothing of its layout)."""
    text = " ".join(str(message).split())
    text = _FLAG.sub(lambda flag: _FIELDS.get(flag.group(0), flag.group(0)), text)
    return _PATH.sub(_hide_path, text)


def _hide_path(found: re.Match[str]) -> str:
    """A server path shown by its last part only (``…/lab.sqlite``)."""
    name = found.group(0).rstrip("/").rsplit("/", 1)[-1]
    return f"…/{name}" if name else "…"


def whole_number(
    text: str | None, name: str, low: int, high: int, default: int | None
) -> int | None:
    """The whole number a form field or query parameter ``name`` holds, within [low, high];
    ``default`` when absent or empty. ASCII digits only ('²' and other digits of Unicode are
    refused) and at most as many as ``high`` has: never an exception from ``int()``."""
    if text is None or not text.strip():
        return default
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > len(str(high)):
        raise BadField(400, f"{name} must be a whole number from {low} to {high}")
    number = int(value)
    if not low <= number <= high:
        raise BadField(400, f"{name} must be a whole number from {low} to {high}")
    return number


def record_id(text: str) -> int | None:
    """An audit record id from a URL: None for anything that cannot be one (too long, not
    digits), which the routes answer 404 as they do an id the audit lacks."""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        return None
    return int(text)
