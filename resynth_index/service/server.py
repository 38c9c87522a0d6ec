"""Running the service: uvicorn, the ``serving on`` line, and a graceful stop.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the requests in flight;
then the lifespan stops the worker, which answers and records every query already queued. The
process then exits 0. Should the models fail to load, the service stops and says why (exit 1).
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable

from resynth_index.errors import RsxError
from resynth_index.service.app import ServiceConfig, create_app
from resynth_index.service.worker import QueryWorker


def url_of(host: str, port: int) -> str:
    """``http://HOST:PORT`` (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    config: ServiceConfig, host: str, port: int, announce: Callable[[str], None] = print
) -> None:
    """Serve until told to stop. ``announce`` gets ``serving on URL`` once the socket listens
    (with port 0, the port the system chose). Raises RsxError when the models cannot load."""
    import uvicorn

    worker = QueryWorker(
        config.lab_dir, config.device, gather_s=config.gather_s, batch_limit=config.batch_limit
    )
    app = create_app(config, worker)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and not self.should_exit:
                bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
                announce(f"serving on {url_of(host, bound)}")

        async def on_tick(self, counter: int) -> bool:
            if worker.failure is not None:
                return True
            return await super().on_tick(counter)

    uvicorn_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=None,
    )
    # uvicorn re-raises the stop signal once it is done; with these no-op handlers in place it
    # lands here instead of killing the process, so a graceful stop exits 0
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(uvicorn_config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.stdout.flush()
    if worker.failure is not None:
        raise RsxError(f"the models could not be loaded: {worker.failure}")


def _ignore(_signal: int, _frame: object) -> None:
    """Swallow the stop signal uvicorn re-raises after its graceful shutdown."""
