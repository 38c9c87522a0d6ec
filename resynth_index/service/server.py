"""Running the service: the listening socket, uvicorn with the connection guard, the ``serving
on`` line once the models answer, one log line per request, and a bounded graceful stop.

The socket is bound before anything loads, so a port in use fails in one line at once. uvicorn
runs with ``GuardedHttpProtocol`` (``service/protocol.py``: connection, header and time limits
before any token is checked). ``serving on URL`` is printed only once the worker has loaded the
models and answers (``/healthz`` is then ready), with where to log in when a token is needed.
On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the requests in flight,
at most ``GRACEFUL_S``; then the lifespan stops the worker, which answers and records the queries
already queued (within its own bound). The process then exits 0. Should the models fail to load,
the service stops and says why (exit 1).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable

from resynth_index.errors import RsxError
from resynth_index.service.app import ServiceConfig, create_app
from resynth_index.service.protocol import ConnectionLimits, guarded_protocol
from resynth_index.service.worker import QueryWorker

#: How long a stop waits for the requests in flight before it cancels them.
GRACEFUL_S = 30
KEEP_ALIVE_S = 5


def url_of(host: str, port: int) -> str:
    """``http://HOST:PORT`` (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (0: any free port), before anything else is loaded;
    RsxError in one line when the address is taken or cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise RsxError(f"cannot listen on {host}: {error.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        hint = "; choose another --port" if error.errno in (98, 48, 10048) else ""
        raise RsxError(f"cannot listen on {url_of(host, port)}: {error.strerror}{hint}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    config: ServiceConfig,
    sock: socket.socket,
    host: str,
    announce: Callable[[str], None] = print,
    *,
    limits: ConnectionLimits | None = None,
    worker: QueryWorker | None = None,
) -> None:
    """Serve on ``sock`` (from ``listening_socket``) until told to stop. ``announce`` gets
    ``serving on URL`` once the models are loaded. Raises RsxError when they cannot load."""
    import uvicorn

    _log_to_stderr()
    model_worker = worker or config.worker()
    counts: Counter[str] = Counter()
    app = create_app(config, model_worker, counts)
    url = url_of(host, sock.getsockname()[1])

    class Server(uvicorn.Server):
        announced = False

        async def on_tick(self, counter: int) -> bool:
            if model_worker.failure is not None:
                return True
            if not self.announced and model_worker.health()[0]:
                self.announced = True
                announce(f"serving on {url}")
                if config.token is not None:
                    announce(
                        f"a token is needed: send 'Authorization: Bearer TOKEN', or log in at"
                        f" {url}/login"
                    )
            return await super().on_tick(counter)

    uvicorn_config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # the Guard logs one line per request
        lifespan="on",
        server_header=False,
        proxy_headers=False,
        http=guarded_protocol(limits or ConnectionLimits(), counts),
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACEFUL_S,
    )
    # uvicorn re-raises the stop signal once it is done; with these no-op handlers in place it
    # lands here instead of killing the process, so a graceful stop exits 0
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(uvicorn_config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    sys.stdout.flush()
    if model_worker.failure is not None:
        raise RsxError(model_worker.health()[1] or model_worker.failure)


def _log_to_stderr() -> None:
    """The service's own lines (``rsx.serve``: one per request, each refusal) on stderr, one
    line each, with the time."""
    logger = logging.getLogger("rsx.serve")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s rsx serve: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _ignore(_signal: int, _frame: object) -> None:
    """Swallow the stop signal uvicorn re-raises after its graceful shutdown."""
