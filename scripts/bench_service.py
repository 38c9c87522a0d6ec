"""Benchmark of `rsx serve` on the toy zoo: what HTTP costs, and how it holds under load.

Rows:
  warm query   one warm query (models loaded, resyntheses cached) through HTTP (multipart upload,
               queue, worker, JSON) vs the same query in-process (``run_queries``), median of N;
               the target row uses a lean client (http.client, the body encoded once), a second
               row shows httpx, which adds its own per-request cost
  load         C clients x Q queries each, against a running service, half of them with a
               caption not yet cached (so generation runs, batched across clients): errors (must
               be 0), p50 and p95 latency, and whether every verdict equals what `rsx query`
               (``run_queries`` on an untouched copy of the lab, one image per call) gives

Usage:
  .venv/bin/python scripts/bench_service.py            # 30 warm queries, 8 clients x 25
  .venv/bin/python scripts/bench_service.py --quick    # a smoke test (2 clients x 4)

The service runs in a subprocess (``rsx --lab LAB serve --port 0``); this process and the
service each use one torch thread, so the two sides of the warm ratio are alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import Row as _Row  # noqa: E402
from bench_common import print_report, print_row  # noqa: E402


class Row(_Row):
    """A table row; a row that reports a figure without a ratio shows '-' for it."""

    def cells(self) -> list[str]:
        cells = super().cells()
        return [*cells[:3], "-" if self.ratio != self.ratio else cells[3], *cells[4:]]


os.environ["OMP_NUM_THREADS"] = "1"
TOY_GENERATORS = {"toy-a": 11, "toy-b": 22, "toy-c": 33}
IMAGES = 4
NO_RATIO = float("nan")


def build_lab(root: Path) -> tuple[Path, list[Path], list[str]]:
    """A toy lab (toy embedder, three toy generators), query images made by them, and one
    caption per image whose resyntheses are already cached."""
    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import GenerationRequest
    from resynth_index.pipeline.query import run_queries

    lab_dir = root / "lab"
    images, captions = [], []
    with Lab.create(lab_dir, embedder="toy") as lab:
        for name, seed in TOY_GENERATORS.items():
            lab.add_toy_generator(name, seed)
        rows = lab.generators()
        for i in range(IMAGES):
            caption = f"cached scene number {i}"
            model = lab.generator_model(rows[i % len(rows)])
            path = root / f"image-{i}.png"
            model.generate([GenerationRequest(caption, 5000 + i)])[0].save(path)
            images.append(path)
            captions.append(caption)
            run_queries(lab, [path], caption=caption)  # caches its resyntheses
    return lab_dir, images, captions


def bench_warm(lab_dir: Path, image: Path, caption: str, n: int) -> list[Row]:
    """A warm query through HTTP vs the same query in-process, the sides taking turns (one
    query each), so a change in the machine's load touches all alike.

    Two clients: the standard library's ``http.client`` with the multipart body encoded once
    (what the service itself costs: parsing, queue, worker, JSON, loopback TCP), and ``httpx``
    encoding every request (what a typical Python client adds on top).
    """
    import http.client
    import json
    from urllib.parse import urlsplit

    import httpx
    import torch

    from resynth_index.lab import Lab
    from resynth_index.pipeline.query import run_queries

    torch.set_num_threads(1)
    payload = image.read_bytes()
    files = {"image": (image.name, payload, "image/png")}
    with (
        Service(lab_dir) as service,
        httpx.Client(base_url=service.url, timeout=300) as client,
        Lab.open(lab_dir) as lab,
    ):
        encoded = client.build_request("POST", "/v1/query", files=files, data={"caption": caption})
        body, content_type = encoded.read(), encoded.headers["content-type"]
        where = urlsplit(service.url)
        lean = http.client.HTTPConnection(where.hostname, where.port, timeout=300)

        def over_stdlib() -> None:
            lean.request("POST", "/v1/query", body=body, headers={"Content-Type": content_type})
            response = lean.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200, answer

        def over_httpx() -> None:
            response = client.post("/v1/query", files=files, data={"caption": caption})
            response.raise_for_status()

        def in_process() -> None:
            run_queries(lab, [image], caption=caption)

        sides = {"stdlib": over_stdlib, "httpx": over_httpx, "local": in_process}
        for _ in range(3):  # warm: models, connections, the worker's memo of warm captions
            for ask in sides.values():
                ask()
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(n):
            for name, ask in sides.items():
                start = time.perf_counter()
                ask()
                times[name].append(time.perf_counter() - start)
        lean.close()
        lab.sync_index()
    local = statistics.median(times["local"])
    rows = []
    for name, label, target in (
        ("stdlib", "http.client, body encoded once", "<= 1.3x"),
        ("httpx", "httpx", "(report)"),
    ):
        http_s = statistics.median(times[name])
        ratio = http_s / local
        rows.append(
            Row(
                f"warm query toy through HTTP ({label}) vs in-process, median of {n}",
                f"{http_s * 1000:.1f} ms",
                f"{local * 1000:.1f} ms in-process",
                ratio,
                target,
                ratio <= 1.3 if target != "(report)" else None,
            )
        )
    return rows


def bench_load(
    lab_dir: Path,
    pristine: Path,
    images: list[Path],
    captions: list[str],
    clients: int,
    per_client: int,
    scratch: Path,
) -> list[Row]:
    """C clients x Q queries, every other one with a fresh caption; then the verdicts checked
    against ``run_queries`` on the untouched copy, one image per call (as ``rsx query`` does)."""
    import httpx

    plan: list[list[tuple[int, str]]] = []  # per client: (image index, caption)
    for c in range(clients):
        asks = []
        for i in range(per_client):
            if i % 2 == 0:
                k = (c + i) % len(images)
                asks.append((k, captions[k]))
            else:
                asks.append(((c + i) % len(images), f"client {c} asks about scene {i}"))
        plan.append(asks)
    payloads = [path.read_bytes() for path in images]
    latencies: list[float] = []
    answers: list[tuple[int, str, dict | None]] = []
    lock = threading.Lock()

    def client_run(asks: list[tuple[int, str]]) -> None:
        with httpx.Client(base_url=service.url, timeout=600) as client:
            for k, caption in asks:
                start = time.perf_counter()
                try:
                    response = client.post(
                        "/v1/query",
                        files={"image": (images[k].name, payloads[k], "image/png")},
                        data={"caption": caption},
                    )
                    answer = response.json() if response.status_code == 200 else None
                except httpx.HTTPError:
                    answer = None
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    answers.append((k, caption, answer))

    with Service(lab_dir) as service:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client_run, plan))
        wall = time.perf_counter() - started
        with httpx.Client(base_url=service.url) as client:
            stats = client.get("/v1/worker").json()
    errors = sum(answer is None for _, _, answer in answers)
    expected = reference_verdicts(pristine, images, {(k, c) for k, c, _ in answers}, scratch)
    same = sum(
        answer is not None and answer["verdict"] == expected[(k, caption)]
        for k, caption, answer in answers
    )
    total = len(answers)
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    label = f"load {clients} clients x {per_client}, half uncached"
    return [
        Row(f"{label}: errors", str(errors), f"{total} queries", NO_RATIO, "0", errors == 0),
        Row(f"{label}: p50 latency", f"{p50 * 1000:.0f} ms", "", NO_RATIO, "(report)", None),
        Row(f"{label}: p95 latency", f"{p95 * 1000:.0f} ms", "", NO_RATIO, "(report)", None),
        Row(
            f"{label}: verdicts = rsx query",
            f"{same}/{total}",
            "",
            same / total if total else 0.0,
            "all",
            same == total,
        ),
        Row(
            f"{label}: throughput",
            f"{total / wall:.1f} q/s",
            f"{stats['batches']} batches, {stats['generation_batches']} generate() calls",
            NO_RATIO,
            "(report)",
            None,
        ),
    ]


def reference_verdicts(
    pristine: Path, images: list[Path], pairs: set[tuple[int, str]], scratch: Path
) -> dict[tuple[int, str], str]:
    """What `rsx query IMAGE --caption CAPTION` answers for each pair, one call per image."""
    import torch

    from resynth_index.lab import Lab
    from resynth_index.pipeline.query import QueryResult, run_queries

    torch.set_num_threads(1)
    found = {}
    with Lab.open(pristine) as lab:
        for k, caption in sorted(pairs):
            [result] = run_queries(lab, [images[k]], caption=caption)
            assert isinstance(result, QueryResult), result
            found[(k, caption)] = result.verdict
    return found


class Service:
    """``rsx --lab LAB serve --port 0`` in a subprocess, ready (healthz ok) inside the block."""

    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = lab_dir
        self.url = ""

    def __enter__(self) -> Service:
        import httpx

        command = [sys.executable, "-m", "resynth_index", "--lab", str(self.lab_dir), "serve"]
        self.process = subprocess.Popen(
            [*command, "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("serving on "):
            self.process.kill()
            raise SystemExit(f"rsx serve did not start: {line!r}")
        self.url = line.split("serving on ", 1)[1].strip()
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=self.url) as client:
            while client.get("/healthz").status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit("rsx serve never loaded its models")
                time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--warm", type=int, help="warm queries timed on each side")
    parser.add_argument("--clients", type=int, help="concurrent clients in the load test")
    parser.add_argument("--per-client", type=int, help="queries each client sends")
    parser.add_argument("--keep", type=Path, help="build the labs here and keep them")
    args = parser.parse_args(argv)
    warm = args.warm or (5 if args.quick else 30)
    clients = args.clients or (2 if args.quick else 8)
    per_client = args.per_client or (4 if args.quick else 25)
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="rsx-bench-service-"))
    scratch.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"rsx serve bench: {os.cpu_count()} CPU(s), load average {load[0]:.2f} at start")
    rows: list[Row] = []
    try:
        lab_dir, images, captions = build_lab(scratch)
        pristine = scratch / "pristine"
        shutil.copytree(lab_dir, pristine)
        for row in bench_warm(lab_dir, images[0], captions[0], warm):
            rows.append(row)
            print_row(row)
        for row in bench_load(lab_dir, pristine, images, captions, clients, per_client, scratch):
            rows.append(row)
            print_row(row)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print_report(rows, [f"load average at end: {os.getloadavg()[0]:.2f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
