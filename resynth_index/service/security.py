"""Who may talk to the service, and the headers every answer carries.

* Loopback by default: any other ``--host`` needs a token (``check_bind``).
* With a token, every request needs ``Authorization: Bearer TOKEN`` or the login cookie the page's
  login form sets (HttpOnly, SameSite=Strict). The cookie is a session of ``Sessions``: signed
  with a secret of this process and carrying its expiry, so it is worth nothing after its hours,
  after a restart, or after any logout (which draws a new secret, ending every session). Secrets
  compare with ``hmac.compare_digest``. A form post made with the cookie must also carry the CSRF
  token the page embeds (``csrf_ok``), derived from the session. Failed logins are limited per
  client address (``LoginThrottle``).
* Without a token the service answers clients on this machine only: the peer address must be a
  loopback one, a request relayed by a proxy (``Forwarded``, ``X-Forwarded-For``, ...) is refused
  (a proxy on the same host would otherwise expose it), and a ``Host`` header that does not name
  the loopback is refused too (a DNS-rebinding page in a browser cannot read it).
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
import logging
import math
import secrets
import stat
import time
from collections import Counter, OrderedDict
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
#: Headers a reverse proxy adds: a request carrying one came from elsewhere, whatever its peer.
_FORWARDED = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")

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


def token_file_warning(path: Path) -> str | None:
    """A warning when other users of this machine may read the token file, else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & 0o077:
        return (
            f"warning: the token file {path} can be read by other users (mode"
            f" {stat.S_IMODE(mode):04o}); make it private: chmod 600 {path}"
        )
    return None


#: How long a login lasts.
SESSION_S = 12 * 3600


class Sessions:
    """Login sessions: a cookie value is ``EXPIRY.SIGNATURE``, signed with a secret this process
    drew at random. Nothing is stored per session; ``end_all`` (a logout) draws a new secret,
    which ends every session at once, the one logging out included."""

    def __init__(self, lifetime_s: float = SESSION_S) -> None:
        self.lifetime_s = lifetime_s
        self._secret = secrets.token_bytes(32)

    def issue(self) -> str:
        """A new session's cookie value."""
        expiry = str(int(time.time() + self.lifetime_s))
        return f"{expiry}.{self._sign(expiry)}"

    def valid(self, value: str | None) -> bool:
        """Whether ``value`` is a session this secret signed that has not expired."""
        if not value:
            return False
        expiry, _, signature = value.partition(".")
        if not expiry.isascii() or not expiry.isdigit() or len(expiry) > 12:
            return False
        return same_secret(signature, self._sign(expiry)) and int(expiry) > time.time()

    def csrf(self, value: str | None) -> str:
        """The CSRF token the page embeds for the session ``value`` ('' without one)."""
        return self._sign(f"csrf:{value}") if value else ""

    def end_all(self) -> None:
        self._secret = secrets.token_bytes(32)

    def cookie(self, value: str) -> str:
        """The Set-Cookie value of a login."""
        return (
            f"{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict;"
            f" Max-Age={int(self.lifetime_s)}"
        )

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()


class LoginThrottle:
    """Failed logins per client address: at most ``attempts`` in ``window_s``; then the client
    waits until the oldest failure leaves the window (``retry_after``)."""

    def __init__(self, attempts: int = 5, window_s: float = 60.0, clients: int = 10_000) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.clients = clients
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def retry_after(self, client: str) -> int:
        """Seconds ``client`` must wait before trying again (0: it may try now)."""
        recent = self._recent(client)
        if len(recent) < self.attempts:
            return 0
        return max(1, math.ceil(recent[0] + self.window_s - time.monotonic()))

    def failed(self, client: str) -> None:
        recent = self._recent(client)
        recent.append(time.monotonic())
        self._failures[client] = recent
        self._failures.move_to_end(client)
        while len(self._failures) > self.clients:  # memory bounded whatever the addresses
            self._failures.popitem(last=False)

    def _recent(self, client: str) -> list[float]:
        now = time.monotonic()
        return [t for t in self._failures.get(client, []) if now - t < self.window_s]


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets (their lengths may leak, their bytes do not)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def cleared_cookie() -> str:
    """The Set-Cookie value of a logout."""
    return f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"


def csrf_ok(scope: Scope, sessions: Sessions, given: str | None) -> bool:
    """Whether a state-changing request may go on: only a cookie login needs the CSRF token
    (a bearer token is never sent by a browser on its own; without a token, ``Guard`` has
    already refused other origins)."""
    if scope.get("rsx_auth") != "cookie":
        return True
    expected = sessions.csrf(scope.get("rsx_session"))
    return bool(given) and bool(expected) and same_secret(given or "", expected)


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
        sessions: Sessions,
        render_login: Callable[[str], str],
        counts: Counter[str] | None = None,
    ) -> None:
        self.app = app
        self.token = token
        self.sessions = sessions
        self.render_login = render_login
        self.counts = counts if counts is not None else Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status: list[int] = []
        logged = _logging(send, status)
        try:
            headers = _headers(scope)
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                code, message = refusal
                # a browser asking for a page gets the login form, without a word of blame
                login = self.render_login if self._wants_page(scope, headers) else None
                await _refuse(logged, code, message, login)
                return
            await self.app(scope, receive, _with_security_headers(logged))
        finally:
            self.counts["requests"] += 1
            self.counts[f"status {status[0] if status else 'none'}"] += 1
            access_log(scope, status[0] if status else None, time.monotonic() - started)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        """(status, one line) when the request must stop here, else None (it may go on)."""
        if self.token is None:
            client = scope.get("client")
            if not client or not is_loopback(str(client[0])):
                return 403, "this service answers clients on its own machine only (no token set)"
            if any(name in headers for name in _FORWARDED):  # a proxy on this machine relays
                return 403, "a request relayed by a proxy needs the service to have a token"
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
        if self.sessions.valid(cookie):
            scope["rsx_auth"] = "cookie"
            scope["rsx_session"] = cookie
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


log = logging.getLogger("rsx.serve")


def access_log(scope: Scope, status: int | None, seconds: float) -> None:
    """One line per request: the client, the method and path (no query string: it may hold a
    caption), the status and the time taken."""
    client = scope.get("client")
    who = f"{client[0]}" if client else "-"
    path = "".join(c if c.isprintable() else "?" for c in str(scope.get("path", "")))[:200]
    log.info('%s "%s %s" %s %.0f ms', who, scope.get("method"), path, status or "-", seconds * 1e3)


def _logging(send: Send, status: list[int]) -> Send:
    """``send``, noting the response's status for the access log."""

    async def noting(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(int(message["status"]))
        await send(message)

    return noting


async def _refuse(
    send: Send, status: int, message: str, login: Callable[[str], str] | None
) -> None:
    """The refusal: ``{"error": ...}`` for API clients, the login page for a browser (401)."""
    guard_send = _with_security_headers(send)
    if login is not None and status == 401:
        body = login("").encode("utf-8")
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
