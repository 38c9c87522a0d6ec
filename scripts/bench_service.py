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
  lanes        C clients for S seconds (20 x 60 by default), a quarter of them asking captions
               never asked (generation runs all along), the rest captions whose resyntheses are
               stored: p50, p95 and errors of cached and of new queries apart, with the worker's
               fast lane and then without it (``fast_lane=False``, one thread answers all: the
               baseline, measured in the same run on a fresh copy of the same lab); the cached
               queries' p95 must stay within 2x their p50 while generation runs

Usage:
  .venv/bin/python scripts/bench_service.py            # 30 warm queries, 8 clients x 25, lanes
  .venv/bin/python scripts/bench_service.py --quick    # a smoke test (2 clients x 4, 4 x 10 s)
  .venv/bin/python scripts/bench_service.py --only lanes

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
                answer, elapsed = _timed_query(client, images[k].name, payloads[k], caption)
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


def bench_lanes(
    lab_dir: Path,
    images: list[Path],
    captions: list[str],
    clients: int,
    seconds: float,
    scratch: Path,
) -> list[Row]:
    """Cached queries beside generation, with the fast lane and without it (see the module
    notes); each side on its own fresh copy of the lab, so its new captions are new to it."""
    found = {}
    for fast_lane in (True, False):
        copy = scratch / f"lanes-{'fast' if fast_lane else 'one'}"
        shutil.copytree(lab_dir, copy)
        found[fast_lane] = lane_latencies(copy, images, captions, clients, seconds, fast_lane)
    label = f"lanes {clients} clients x {seconds:g} s, 1 in 4 asking new captions"
    rows = []
    for fast_lane, name in ((True, "fast lane"), (False, "one lane (baseline)")):
        for kind in ("cached", "new"):
            times, errors = found[fast_lane][kind]
            p50, p95 = _percentile(times, 0.5), _percentile(times, 0.95)
            rows.append(
                Row(
                    f"{label}, {name}: {kind} p50 / p95 (errors)",
                    f"{p50 * 1000:.0f} / {p95 * 1000:.0f} ms ({errors})",
                    f"{len(times)} answered",
                    NO_RATIO,
                    "0 errors",
                    errors == 0,
                )
            )
    cached_fast, _ = found[True]["cached"]
    cached_one, _ = found[False]["cached"]
    p50, p95 = _percentile(cached_fast, 0.5), _percentile(cached_fast, 0.95)
    baseline_p95 = _percentile(cached_one, 0.95)
    rows.append(
        Row(
            f"{label}: cached p95 / p50 with the fast lane",
            f"{p95 * 1000:.0f} ms",
            f"{p50 * 1000:.0f} ms p50",
            p95 / p50 if p50 else NO_RATIO,
            "<= 2x",
            p95 <= 2 * p50,
        )
    )
    rows.append(
        Row(
            f"{label}: cached p95, fast lane vs one lane",
            f"{p95 * 1000:.0f} ms",
            f"{baseline_p95 * 1000:.0f} ms one lane",
            p95 / baseline_p95 if baseline_p95 else NO_RATIO,
            "(report)",
            None,
        )
    )
    return rows


def lane_latencies(
    lab_dir: Path,
    images: list[Path],
    captions: list[str],
    clients: int,
    seconds: float,
    fast_lane: bool,
) -> dict[str, tuple[list[float], int]]:
    """kind ("cached", "new") -> (latencies of the answered queries, errors): client ``c``
    asks new captions when ``c % 4 == 0``, cached ones otherwise, one after the other until
    ``seconds`` have passed."""
    import httpx

    payloads = [path.read_bytes() for path in images]
    found: dict[str, tuple[list[float], int]] = {"cached": ([], 0), "new": ([], 0)}
    lock = threading.Lock()

    def client_run(c: int, url: str, end: float) -> None:
        kind = "new" if c % 4 == 0 else "cached"
        with httpx.Client(base_url=url, timeout=600) as client:
            i = 0
            while time.perf_counter() < end:
                k = (c + i) % len(images)
                caption = f"client {c} asks about new scene {i}" if kind == "new" else captions[k]
                answer, elapsed = _timed_query(client, images[k].name, payloads[k], caption)
                ok = answer is not None
                with lock:
                    times, errors = found[kind]
                    if ok:
                        times.append(elapsed)
                    found[kind] = (times, errors + (not ok))
                i += 1

    with Service(lab_dir, fast_lane=fast_lane) as service:
        with httpx.Client(base_url=service.url) as client:
            shown = client.get("/v1/worker").json().get("fast_lane")
        if shown != fast_lane:
            raise SystemExit(f"the service's worker has fast_lane={shown}, not {fast_lane}")
        end = time.perf_counter() + seconds
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client_run, range(clients), [service.url] * clients, [end] * clients))
    return found


def _percentile(values: list[float], q: float) -> float:
    """The value at quantile ``q`` of ``values`` (nearest rank); nan when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def reference_verdicts(
    pristine: Path, images: list[Path], pairs: set[tuple[int, str]], scratch: Path
) -> dict[tuple[int, str], str]:
    """What `rsx query IMAGE --caption CAPTION` answers for each pair, one call per image."""
    import torch

    from resynth_index.attribution.answer import QueryResult
    from resynth_index.lab import Lab
    from resynth_index.pipeline.query import run_queries

    torch.set_num_threads(1)
    found = {}
    with Lab.open(pristine) as lab:
        for k, caption in sorted(pairs):
            [result] = run_queries(lab, [images[k]], caption=caption)
            assert isinstance(result, QueryResult), result
            found[(k, caption)] = result.verdict
    return found


#: ``rsx`` with the worker's fast lane off by default (``rsx serve`` has no option for it): the
#: baseline of the lanes row. The row checks ``/v1/worker`` says so.
_WITHOUT_FAST_LANE = (
    "import sys; from resynth_index.service.worker import QueryWorker;"
    " QueryWorker.__init__.__kwdefaults__['fast_lane'] = False;"
    " from resynth_index.cli import main; sys.argv[0] = 'rsx'; main()"
)


class Service:
    """``rsx --lab LAB serve --port 0`` in a subprocess, ready (healthz ok) inside the block;
    ``fast_lane=False``: its worker answers everything on one thread."""

    def __init__(self, lab_dir: Path, fast_lane: bool = True) -> None:
        self.lab_dir = lab_dir
        self.fast_lane = fast_lane
        self.url = ""

    def __enter__(self) -> Service:
        import httpx

        rsx = ["-m", "resynth_index"] if self.fast_lane else ["-c", _WITHOUT_FAST_LANE]
        command = [sys.executable, *rsx, "--lab", str(self.lab_dir), "serve"]
        # the service logs a line per request: kept in a file beside the lab, not on the table
        self.log = self.lab_dir.parent / f"{self.lab_dir.name}-serve.log"
        with open(self.log, "a", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [*command, "--port", "0"],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("serving on "):
            self.process.kill()
            raise SystemExit(f"rsx serve did not start: {line!r}; see {self.log}")
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


def _timed_query(client, name: str, payload: bytes, caption: str) -> tuple[dict | None, float]:
    """One query through HTTP: (its answer, or None when it failed; seconds it took)."""
    import httpx

    start = time.perf_counter()
    try:
        response = client.post(
            "/v1/query", files={"image": (name, payload, "image/png")}, data={"caption": caption}
        )
        answer = response.json() if response.status_code == 200 else None
    except httpx.HTTPError:
        answer = None
    return answer, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--warm", type=int, help="warm queries timed on each side")
    parser.add_argument("--clients", type=int, help="concurrent clients in the load test")
    parser.add_argument("--per-client", type=int, help="queries each client sends")
    parser.add_argument("--lane-clients", type=int, help="clients in the lanes row (20)")
    parser.add_argument("--lane-seconds", type=float, help="how long each side of it runs (60)")
    parser.add_argument("--only", choices=("warm", "load", "lanes"), help="one row group only")
    parser.add_argument("--keep", type=Path, help="build the labs here and keep them")
    args = parser.parse_args(argv)
    warm = args.warm or (5 if args.quick else 30)
    clients = args.clients or (2 if args.quick else 8)
    per_client = args.per_client or (4 if args.quick else 25)
    lane_clients = args.lane_clients or (4 if args.quick else 20)
    lane_seconds = args.lane_seconds or (10.0 if args.quick else 60.0)
    wanted = {args.only} if args.only else {"warm", "load", "lanes"}
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="rsx-bench-service-"))
    scratch.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"rsx serve bench: {os.cpu_count()} CPU(s), load average {load[0]:.2f} at start")
    rows: list[Row] = []
    try:
        lab_dir, images, captions = build_lab(scratch)
        pristine = scratch / "pristine"
        shutil.copytree(lab_dir, pristine)
        groups = {
            "warm": lambda: bench_warm(lab_dir, images[0], captions[0], warm),
            "load": lambda: bench_load(
                lab_dir, pristine, images, captions, clients, per_client, scratch
            ),
            "lanes": lambda: bench_lanes(
                pristine, images, captions, lane_clients, lane_seconds, scratch
            ),
        }
        for name, bench in groups.items():
            if name not in wanted:
                continue
            for row in bench():
                rows.append(row)
                print_row(row)
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print_report(rows, [f"load average at end: {os.getloadavg()[0]:.2f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
