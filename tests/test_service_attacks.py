"""`rsx serve` attacked as a lab network would attack it: before the token, with bad input, and
where its own parts fail. A real uvicorn on a port the system picks, raw sockets for what an HTTP
client library would not send. Every refusal is one JSON line with the right status; nothing a
client sends makes a traceback in the service's log; memory stays bounded.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
from serving import make_toy_images, rsx_command, running_service  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("serve_extra")]

TOKEN = "attack-test-token-0123456789"
SHORT = ("--header-timeout", "1.5", "--body-timeout", "1.5")


@pytest.fixture(scope="module")
def guarded(toy_lab_template: Path, tmp_path_factory):
    """A token-guarded service with short timeouts, a small pixel budget and few connections."""
    import shutil

    root = tmp_path_factory.mktemp("attacks")
    lab = shutil.copytree(toy_lab_template, root / "lab")
    token_file = root / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    token_file.chmod(0o600)
    args = ("--token-file", str(token_file), "--max-pixels", "1000000", *SHORT)
    args += ("--max-connections", "400")
    with running_service(lab, *args, token=TOKEN) as service:
        yield service
    assert "Traceback" not in service.stderr()


def _port(service) -> int:
    return int(service.url.rsplit(":", 1)[1])


def _raw(service, data: bytes, *, read: bool = True, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection; what came back until the server closed it."""
    with socket.create_connection(("127.0.0.1", _port(service)), timeout=timeout) as conn:
        conn.sendall(data)
        return _read_all(conn) if read else b""


def _read_all(conn: socket.socket) -> bytes:
    received = bytearray()
    while True:
        try:
            chunk = conn.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        received.extend(chunk)
    return bytes(received)


def _status(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


def _rss_kib(service) -> int:
    status = Path(f"/proc/{service.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


# ---------------------------------------------------------------- before the token
def test_an_endless_header_line_is_cut_off_at_the_limit(guarded):
    sent = 0
    with socket.create_connection(("127.0.0.1", _port(guarded)), timeout=10) as conn:
        conn.sendall(b"GET /v1/worker HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: ")
        try:
            while sent < 200 * 1024 * 1024:  # a 200 MiB header line, if nothing stops it
                conn.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_all(conn)
    assert sent < 8 * 1024 * 1024  # cut off after the 16 KiB header block and the socket buffers
    if reply:  # the refusal, unless the reset came first
        assert _status(reply) == 431 and b"exceed 16384 bytes" in reply


def test_too_many_header_fields_are_refused(guarded):
    fields = b"".join(b"X-F%d: v\r\n" % n for n in range(150))
    reply = _raw(guarded, b"GET /v1/worker HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n")
    assert _status(reply) == 431 and b"at most 100 header fields" in reply


def test_slow_headers_and_slow_bodies_time_out(guarded):
    started = time.monotonic()
    reply = _raw(guarded, b"GET /v1/worker HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ended
    assert _status(reply) == 408 and time.monotonic() - started < 10
    head = (
        b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
    )
    started = time.monotonic()
    reply = _raw(guarded, head + b"--b\r\n")  # the body stops after a few bytes
    assert time.monotonic() - started < 10  # closed, not waited on for ever
    assert reply == b"" or _status(reply) >= 400


def test_an_authorised_client_is_served_while_300_idle_connections_are_open(guarded):
    idle = []
    try:
        for _ in range(300):
            conn = socket.create_connection(("127.0.0.1", _port(guarded)), timeout=10)
            conn.sendall(b"GET /v1/worker HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Unfinished: ")
            idle.append(conn)
        with guarded.client() as client:
            started = time.monotonic()
            answer = client.get("/v1/worker")
            assert answer.status_code == 200, answer.text
            assert time.monotonic() - started < 1.0  # served at once, not after the timeouts
    finally:
        for conn in idle:
            conn.close()


def test_past_the_connection_cap_one_more_is_refused_503(toy_lab_template, tmp_path):
    import shutil

    lab = shutil.copytree(toy_lab_template, tmp_path / "lab")
    with running_service(lab, "--max-connections", "8", *SHORT) as service:
        held = [socket.create_connection(("127.0.0.1", _port(service))) for _ in range(8)]
        try:
            time.sleep(0.2)  # let the loop accept them (a wait on no condition we can observe)
            reply = _raw(service, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _status(reply) == 503 and b"retry-after: 5" in reply.lower()
        finally:
            for conn in held:
                conn.close()
        with service.client() as client:
            stats = client.get("/v1/stats").json()
        assert stats["service"]["connections"] >= 1


# ---------------------------------------------------------------- memory and bad input
def _png(width: int, height: int) -> bytes:
    out = BytesIO()
    Image.new("L", (width, height)).save(out, "PNG")  # a few KB of zeros, many pixels
    return out.getvalue()


def test_pixel_bombs_are_refused_from_the_header_and_memory_stays_bounded(guarded):
    over = _png(1001, 1000)
    under = _png(999, 1000)
    with guarded.client() as client:
        refused = client.post("/v1/query", files={"image": ("x.png", over, "image/png")})
        assert refused.status_code == 413 and "1001 x 1000 pixels" in refused.json()["error"]
        before = _rss_kib(guarded)

        def post(n: int):
            files = {"image": (f"b{n}.png", under, "image/png")}
            return client.post("/v1/query", files=files, data={"caption": "a", "generate": "0"})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(16)))
    assert all(a.status_code in (200, 503) for a in answers), [a.text for a in answers]
    grown_mb = (_rss_kib(guarded) - before) / 1024
    assert grown_mb < 400, grown_mb  # 16 images of a megapixel: bounded by the budget


def test_malformed_numbers_ids_and_fields_are_400_or_404_never_500(guarded):
    image = _png(8, 8)
    with guarded.client() as client:
        for field in ("²", "٣", "1" * 5000, "-1", "0"):
            answer = client.post(
                "/v1/query",
                files={"image": ("x.png", image, "image/png")},
                data={"resyntheses": field},
            )
            assert answer.status_code == 400 and "resyntheses" in answer.json()["error"], field
        assert client.get("/v1/queries?limit=%C2%B2").status_code == 400
        assert client.get("/v1/queries/" + "9" * 5000).status_code == 404
        missing = client.post("/v1/query", files={"other": ("x.png", image, "image/png")})
        assert missing.status_code == 400 and "'image'" in missing.json()["error"]
        for path in ("/v1/queries/abc", "/queries/12x", "/v1/jobs/" + "x" * 999):
            assert client.get(path).status_code == 404


def test_a_client_hanging_up_mid_upload_leaves_one_line_at_most(guarded):
    head = (
        b"POST /v1/query HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 900000\r\n\r\n"
    )
    body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
    for _ in range(3):
        _raw(guarded, head + body + b"\x89PNG" + b"\0" * 5000, read=False)
    with guarded.client() as client:
        assert client.get("/v1/worker").status_code == 200
    assert "Traceback" not in guarded.stderr()


# ---------------------------------------------------------------- who may talk
def test_without_a_token_only_this_machine_may_talk_not_a_proxy(toy_lab_template, tmp_path):
    import shutil

    lab = shutil.copytree(toy_lab_template, tmp_path / "lab")
    with running_service(lab, *SHORT) as service, service.client() as client:
        assert client.get("/v1/worker").status_code == 200
        relayed = client.get("/v1/worker", headers={"X-Forwarded-For": "203.0.113.9"})
        assert relayed.status_code == 403 and "proxy" in relayed.json()["error"]
        assert client.get("/v1/worker", headers={"Host": "attacker.example"}).status_code == 421


def test_a_peer_that_is_not_the_loopback_is_refused_without_a_token():
    """The Guard itself, given a scope whose peer is another machine (no socket can make one
    reach a service that listens on the loopback only)."""
    import asyncio

    from resynth_index.service.security import Guard, Sessions

    sent: list[dict] = []

    async def app(scope, receive, send):  # pragma: no cover - must not be reached
        raise AssertionError("the request reached the application")

    async def send(message):
        sent.append(message)

    guard = Guard(app, token=None, sessions=Sessions(), render_login=lambda m: m)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/worker",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("10.1.2.3", 5555),
    }
    asyncio.run(guard(scope, None, send))
    assert sent[0]["status"] == 403


def test_sessions_expire_end_at_logout_and_logins_are_throttled(guarded):
    with httpx.Client(base_url=guarded.url, timeout=60) as browser:
        page = browser.get("/login", headers={"accept": "text/html"})
        assert page.status_code == 200 and "wrong" not in page.text.lower()
        logged = browser.post("/login", data={"token": TOKEN})
        assert logged.status_code == 303
        cookie = logged.headers["set-cookie"]
        assert re.search(r"rsx_session=\d+\.[0-9a-f]{64};", cookie) and "Max-Age=43200" in cookie
        home = browser.get("/", headers={"accept": "text/html"})
        assert home.status_code == 200
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', home.text).group(1)
        value = browser.cookies["rsx_session"]
        assert browser.post("/logout", data={"csrf": csrf}).status_code == 303
        # the old cookie, replayed after logout, opens nothing
        replay = httpx.get(f"{guarded.url}/v1/worker", cookies={"rsx_session": value})
        assert replay.status_code == 401
    with httpx.Client(base_url=guarded.url, timeout=60) as attacker:
        codes = [
            attacker.post("/login", data={"token": f"guess-{n}"}).status_code for n in range(7)
        ]
        assert codes[:5] == [401] * 5 and codes[5] == 429
        assert int(attacker.post("/login", data={"token": TOKEN}).headers["retry-after"]) >= 1


def test_a_token_file_others_can_read_is_warned_about(toy_lab_template, tmp_path):
    import shutil

    lab = shutil.copytree(toy_lab_template, tmp_path / "lab")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    token_file.chmod(0o644)
    with running_service(lab, "--token-file", str(token_file), token=TOKEN) as service:
        assert f"the token file {token_file} can be read by other users" in service.stderr()
        assert any("log in at" in line for line in service.stdout_lines)


# ---------------------------------------------------------------- starting, health, logs
def test_a_busy_port_fails_in_one_line_before_the_models_load(toy_lab):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            rsx_command(toy_lab, "serve", "--port", str(port)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    [line] = [line for line in done.stderr.splitlines() if line.strip()]
    assert "cannot listen on" in line and "choose another --port" in line
    assert "serving on" not in done.stdout
    assert time.monotonic() - started < 30


def test_ready_when_it_says_so_and_one_log_line_per_request(guarded):
    with guarded.client() as client:
        assert client.get("/healthz").json() == {"ok": True}
        client.get("/v1/worker")
        client.get("/v1/queries/999999")
    log = guarded.stderr()
    assert re.search(r'rsx serve: 127\.0\.0\.1 "GET /v1/worker" 200 \d+ ms', log)
    assert re.search(r'"GET /v1/queries/999999" 404', log)


def test_health_and_read_routes_say_the_database_is_down(tmp_path, toy_lab_template):
    from postgres import (
        find_pg_bin,
        postgres_missing,
        start_postgres,
        stop_now,
        stop_postgres,
        toy_lab_on,
    )
    from services import require_service

    reason = postgres_missing()
    require_service("postgresql", reason is None, reason or "")
    server = start_postgres(find_pg_bin())
    try:
        lab = tmp_path / "pg-lab"
        toy_lab_on(server, toy_lab_template, lab)
        [image] = make_toy_images(lab, tmp_path / "images", [("toy-a", "a boat", 1000)])
        with running_service(lab, *SHORT) as service, service.client() as client:
            assert client.get("/healthz").json() == {"ok": True}
            stop_now(server)
            health = client.get("/healthz")
            assert health.status_code == 503 and "could not be reached" in health.json()["error"]
            history = client.get("/v1/queries")
            assert history.status_code == 503
            assert history.headers["content-type"] == "application/json"
            asked = client.post(
                "/v1/query",
                files={"image": ("a.png", image.read_bytes(), "image/png")},
                data={"caption": "a boat"},
            )
            assert asked.status_code in (500, 503) and "error" in asked.json()
            assert str(lab) not in asked.text  # no path of the server's disks
        assert "Traceback" not in service.stderr()
    finally:
        stop_postgres(server)
