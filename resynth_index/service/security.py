"""Who may talk to the service, and the headers every answer carries.

* Loopback by default: any other ``--host`` needs a token (``check_bind``).
* With a token, every request needs ``Authorization: Bearer TOKEN`` or the login cookie the page's
  login form sets (HttpOnly, SameSite=Strict). Both compare with ``hmac.compare_digest``. A form
  post made with the cookie must also carry the CSRF token the page embeds (``csrf_ok``).
* Without a token the service answers loopback clients only, and refuses a ``Host`` header that
  does not name the loopback (a DNS-rebinding page in a browser cannot read it).
* A state-changing request from a browser on another origin (``Origin`` or ``Sec-Fetch-Site``
  says so) is refused: no CORS, ever.
* Every response gets nosniff, no framing, same-origin referrers only, no caching, and a
  strict CSP (the page loads its script and style from ``/static`` only: no inline code runs).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from resynth_index.errors import RsxError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SESSION_COOKIE = "rsx_session"
MIN_TOKEN_CHARS = 16
_LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}
#: Paths anyone may fetch: the login form and the page's own script and style.
_OPEN_PATHS = ("/login", "/static/")
_UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) means this machine only."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond the loopback without a token (RsxError, one line)."""
    if not is_loopback(host) and token is None:
        raise RsxError(
            f"refusing to serve on {host} without --token-file: anyone who can reach it could"
            " query and read the lab (loopback needs no token)"
        )


def load_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace dropped); refused when short or absent."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise RsxError(f"cannot read the token file {path}: {error}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise RsxError(
            f"the token in {path} must be at least {MIN_TOKEN_CHARS} characters without spaces;"
            " make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def session_value(token: str) -> str:
    """The login cookie's value: derived from the token, never the token itself."""
    return hmac.new(token.encode(), b"rsx-session", hashlib.sha256).hexdigest()


def csrf_value(token: str | None) -> str:
    """The CSRF token the page embeds in its forms ('' when the service has no token)."""
    if token is None:
        return ""
    message = b"rsx-csrf:" + session_value(token).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets (their lengths may leak, their bytes do not)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def session_cookie(token: str) -> str:
    """The Set-Cookie value of a login."""
    return f"{SESSION_COOKIE}={session_value(token)}; Path=/; HttpOnly; SameSite=Strict"


def cleared_cookie() -> str:
    """The Set-Cookie value of a logout."""
    return f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"


def csrf_ok(scope: Scope, token: str | None, given: str | None) -> bool:
    """Whether a state-changing request may go on: only a cookie login needs the CSRF token
    (a bearer token is never sent by a browser on its own; without a token, ``Guard`` has
    already refused other origins)."""
    if token is None or scope.get("rsx_auth") != "cookie":
        return True
    return given is not None and same_secret(given, csrf_value(token))


class Guard:
    """ASGI middleware: the Host, Origin and token checks, then the security headers.

    ``render_login(message)`` gives the HTML login page that a browser asking for a page
    without credentials gets (with status 401); API clients get ``{"error": ...}``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        render_login: Callable[[str], str],
    ) -> None:
        self.app = app
        self.token = token
        self.render_login = render_login

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, message = refusal
            login = self.render_login if self._wants_page(scope, headers) else None
            await _refuse(send, status, message, login)
            return
        await self.app(scope, receive, _with_security_headers(send))

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        """(status, one line) when the request must stop here, else None (it may go on)."""
        if self.token is None:
            host = urlsplit("//" + headers.get("host", "")).hostname or ""
            if not is_loopback(host):
                return 421, "this service answers requests addressed to the loopback only"
        if scope["method"] in _UNSAFE_METHODS and _cross_origin(headers):
            return 403, "cross-origin requests are refused"
        if self.token is None:
            scope["rsx_auth"] = "open"
            return None
        if any(scope["path"].startswith(p) for p in _OPEN_PATHS):
            scope["rsx_auth"] = "none"
            return None
        authorization = headers.get("authorization", "")
        if authorization[:7].lower() == "bearer " and same_secret(authorization[7:], self.token):
            scope["rsx_auth"] = "bearer"
            return None
        cookie = _cookie(headers.get("cookie", ""), SESSION_COOKIE)
        if cookie is not None and same_secret(cookie, session_value(self.token)):
            scope["rsx_auth"] = "cookie"
            return None
        return 401, "a valid token is needed: send 'Authorization: Bearer TOKEN' or log in"

    @staticmethod
    def _wants_page(scope: Scope, headers: dict[str, str]) -> bool:
        path = scope["path"]
        return (
            scope["method"] == "GET"
            and not path.startswith("/v1/")
            and path != "/healthz"
            and "text/html" in headers.get("accept", "")
        )


async def _refuse(
    send: Send, status: int, message: str, login: Callable[[str], str] | None
) -> None:
    """The refusal: ``{"error": ...}`` for API clients, the login page for a browser (401)."""
    guard_send = _with_security_headers(send)
    if login is not None and status == 401:
        body = login(message).encode("utf-8")
        await _send(guard_send, status, body, b"text/html; charset=utf-8")
        return
    extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
    body = json.dumps({"error": message}).encode("utf-8")
    await _send(guard_send, status, body, b"application/json", extra)


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            present = {name.lower() for name, _ in headers}
            headers += [h for h in SECURITY_HEADERS if h[0] not in present]
            if b"cache-control" not in present:
                headers.append((b"cache-control", b"no-store"))
            message["headers"] = headers
        await send(message)

    return wrapped


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers, lower-cased names; a repeated header keeps its first value."""
    found: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        found.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return found


def _cross_origin(headers: dict[str, str]) -> bool:
    """Whether a browser says this request comes from a page of another origin.

    ``Sec-Fetch-Site`` decides when the browser sends it; older browsers are judged by
    ``Origin`` (``null`` counts as foreign). Clients that are not browsers send neither.
    """
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site not in {"same-origin", "none"}
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser's cross-origin request (curl, httpx, a same-origin GET)
    parts = urlsplit(origin)
    return origin == "null" or parts.netloc.lower() != headers.get("host", "").lower()


def _cookie(header: str, name: str) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # a malformed Cookie header is no login
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None
