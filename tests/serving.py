"""A real ``rsx serve`` for the tests: a uvicorn subprocess on a port the system picks.

``running_service(lab, ...)`` starts ``rsx --lab LAB serve --port 0`` (port 0: the system picks
a free port, so parallel test runs never race for one), reads the ``serving on URL`` line, waits
for ``/healthz`` to say the models are loaded, and stops the service with SIGTERM afterwards.
Every wait is on a condition with a generous deadline, never a fixed sleep.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 120.0


@dataclass
class RunningService:
    """A started service: its URL, its process, and the token its requests need (if any)."""

    url: str
    process: subprocess.Popen
    lab: Path
    stderr_path: Path
    token: str | None = None
    stdout_lines: list[str] = field(default_factory=list)

    def client(self, **kwargs) -> httpx.Client:
        """An httpx client for the service (with the bearer token when there is one)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(kwargs.pop("headers", {}))
        return httpx.Client(base_url=self.url, headers=headers, timeout=120.0, **kwargs)

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the process to end; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"rsx serve did not stop on {sig!r}: {self.stderr()}") from None


def rsx_command(lab: Path, *args: str) -> list[str]:
    """``rsx --lab LAB ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "resynth_index", "--lab", str(lab), *args]


@contextmanager
def running_service(
    lab: Path, *args: str, token: str | None = None, workdir: Path | None = None
) -> Iterator[RunningService]:
    """``rsx --lab LAB serve --port 0 ARGS``, ready (models loaded), stopped afterwards."""
    folder = workdir or lab.parent
    stderr_path = folder / f"serve-{os.getpid()}-{time.monotonic_ns()}.stderr"
    with open(stderr_path, "w", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            rsx_command(lab, "serve", "--port", "0", *args),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    lines: queue.Queue[str | None] = queue.Queue()
    service = RunningService("", process, lab, stderr_path, token)

    def pump() -> None:  # keeps the pipe drained for the life of the process
        assert process.stdout is not None
        for line in process.stdout:
            service.stdout_lines.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        service.url = _wait_for_url(lines, service)
        _wait_until_healthy(service)
        yield service
    finally:
        if process.poll() is None:
            service.stop()


def _wait_for_url(lines: queue.Queue, service: RunningService) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            break
        if line.startswith("serving on "):
            return line.split("serving on ", 1)[1].strip()
    service.process.kill()
    raise AssertionError(f"rsx serve did not start: {service.stderr()}")


def _wait_until_healthy(service: RunningService) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with service.client() as client:
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise AssertionError(f"rsx serve exited early: {service.stderr()}")
            response = client.get("/healthz")
            if response.status_code == 200 and response.json() == {"ok": True}:
                return
            time.sleep(0.1)
    raise AssertionError(f"rsx serve never became healthy: {service.stderr()}")


def make_toy_images(lab: Path, folder: Path, specs: list[tuple[str, str, int]]) -> list[Path]:
    """PNG files made by the lab's toy generators: one per (generator, caption, seed)."""
    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import GenerationRequest

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with Lab.open(lab) as opened:
        rows = {row.name: row for row in opened.generators()}
        for generator, caption, seed in specs:
            model = opened.generator_model(rows[generator])
            image: Image.Image = model.generate([GenerationRequest(caption, seed)])[0]
            path = folder / f"{generator}-{seed}.png"
            image.save(path)
            paths.append(path)
    return paths


def skip_without_serve_extra() -> None:
    """Skip (or fail, under RSX_REQUIRE_SERVICES=1) when the [serve] extra is not installed."""
    from services import require_service

    try:
        import python_multipart  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        require_service("rsx serve", False, f"the [serve] extra is not installed ({error})")
