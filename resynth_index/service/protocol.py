"""The limits a connection meets before any token is checked: uvicorn's HTTP protocol, guarded.

uvicorn leaves these to a proxy in front (nginx's ``large_client_header_buffers``,
``client_header_timeout``, ``client_body_timeout``; gunicorn's ``limit_request_field_size`` and
``limit_request_fields``). A lab service may face its network directly, so the protocol every
connection gets enforces them itself, in the spirit of those servers' defaults:

* **connections**: past ``max_connections`` open at once, a new one is answered 503 with
  ``Retry-After`` and closed (uvicorn's own ``limit_concurrency`` is checked only once a
  request's headers are in, which idle connections never send);
* **the header block**: at most ``max_header_bytes`` (request line and headers together) and
  ``max_headers`` fields, else 431; the bytes are counted as they arrive, before the parser
  keeps them, so an endless header line costs this much memory and no more;
* **time**: the header block must arrive within ``header_timeout_s`` of the connection (or of
  the previous request's end), else 408; a body must keep arriving, at most ``body_timeout_s``
  between two pieces, else the connection is closed (the request then ends as a disconnect).

Each refusal is one JSON line ``{"error": ...}`` and one log line, never a traceback, and is
counted in ``refusals`` (``GET /v1/stats``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("rsx.serve")

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@dataclass(frozen=True)
class ConnectionLimits:
    """What a connection may cost before the application sees its request."""

    max_connections: int = 512
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    retry_after_s: int = 5


def guarded_protocol(limits: ConnectionLimits, refusals: Counter[str]) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn is given (``Config(http=...)``): ``limits`` enforced, each
    refusal counted in ``refusals`` by its reason."""
    return type(
        "GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits, "refusals": refusals}
    )


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of ``ConnectionLimits`` (see the module)."""

    limits: ConnectionLimits = ConnectionLimits()
    refusals: Counter[str] = Counter()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True  # reading a request line and headers (not a body, not idle)
        self._header_bytes = 0
        self._header_count = 0
        self._too_large = False
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # ------------------------------------------------------------------ the connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self._refuse(
                503,
                "too many connections are open; retry shortly",
                reason="connections",
                retry_after=True,
            )
            return
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        if self._in_headers:
            room = self.limits.max_header_bytes - self._header_bytes
            head, rest = data[: max(room, 0)], data[max(room, 0) :]
            self._header_bytes += len(head)
            if head and not self._feed(head):
                return
            if rest and self._in_headers:  # the header block goes on past the limit
                self._refuse(
                    431,
                    f"the request line and headers exceed {self.limits.max_header_bytes} bytes",
                    reason="headers",
                )
                return
            data = rest
        if data:
            self._feed(data)

    def _feed(self, data: bytes) -> bool:
        """Hand ``data`` to the parser; False when the request was refused meanwhile."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades (websockets) are not served", reason="upgrade")
            return False
        except httptools.HttpParserError:
            if self._too_large:
                self._refuse(
                    431, f"a request may carry at most {self.limits.max_headers} header fields",
                    reason="headers",
                )  # fmt: skip
            else:
                self._refuse(400, "malformed HTTP request", reason="malformed")
            return False
        return not self._refused

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        if self._timer is None:  # a keep-alive connection's next request: its headers timed
            self._arm(self.limits.header_timeout_s, self._header_timeout)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._too_large = True
            raise ValueError("too many header fields")  # stops the parser: refused as 431
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()
        if self.parser is not None and self.cycle is not None and self.cycle.more_body:
            self._arm(self.limits.body_timeout_s, self._body_timeout)

    def on_body(self, body: bytes) -> None:
        if self._timer is not None:  # the body keeps coming: its clock starts again
            self._arm(self.limits.body_timeout_s, self._body_timeout)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_headers = True  # whatever comes next is the next request's header block
        self._header_bytes = 0
        super().on_message_complete()

    # ------------------------------------------------------------------ timers and refusals
    def _arm(self, seconds: float, handler: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, handler)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self._in_headers and self.transport is not None and not self.transport.is_closing():
            if self._header_bytes == 0 and self.cycle is not None:
                self.transport.close()  # an idle keep-alive connection: closed without a word
                return
            self._refuse(
                408,
                f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s",
                reason="header-timeout",
            )

    def _body_timeout(self) -> None:
        self._timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.refusals["body-timeout"] += 1
            log.warning("%s: closed: no request body for %gs", _peer(self.client),
                        self.limits.body_timeout_s)  # fmt: skip
            self.transport.close()  # the application sees a disconnect

    def _refuse(self, status: int, message: str, *, reason: str, retry_after: bool = False) -> None:
        """Answer ``status`` with one JSON line and close the connection."""
        self._refused = True
        self._disarm()
        self.refusals[reason] += 1
        log.warning("%s: refused (%d): %s", _peer(self.client), status, message)
        body = json.dumps({"error": message}).encode()
        head = [
            b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            b"connection: close",
        ]
        if retry_after:
            head.append(b"retry-after: %d" % self.limits.retry_after_s)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
