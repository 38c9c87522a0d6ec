"""Does a CLI query cost more in a big lab? The query path at N=10 and at a large N, before/after.

A CLI query opens the lab, answers one image and closes it. Before: it opened the vector index
(read and SHA-256 the whole file, parse it) and saved it at the end (rewrite and fsync it whole),
O(N). After: it reads its few vectors by id from the database and leaves the index alone. Both
paths run here in the same process on the same labs, each in a block of queries (see
``timed_queries``): "after" is ``run_queries`` as it is; "before" forces what it used to do
around it (``lab.index`` opened first, ``lab.sync_index()`` after). The target: at the large N
a query costs at most 50 ms more than at N=10.

The labs use a stand-in embedder (a fixed random projection of 16x16 pixels to ``--dim``
values, about 0.1 ms an image): the model's cost is the same at any N, so leaving it out shows
what N changes. The filler embeddings are random unit vectors written straight into the store's
tables (``fill``), no model forward; three toy generators make the candidates' resyntheses
once, in a warm-up query.

Usage:
  .venv/bin/python scripts/bench_query_scale.py                  # N = 10 and 200,000, dim 512
  .venv/bin/python scripts/bench_query_scale.py --large 1000000  # ~7 GB of disk, ~6 min
  .venv/bin/python scripts/bench_query_scale.py --large 20000 --queries 3   # a smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CAPTION = "a lighthouse on a cliff at dusk"
TOY_GENERATORS = (("a", 11), ("b", 22), ("c", 33))


class ProjectionEmbedder:
    """A stand-in embedder of any dimension: a fixed random projection of 16x16 RGB pixels,
    L2-normalised. Deterministic, and cheap enough that the timings show the store, not a model."""

    precision = "fp32"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.fingerprint = hashlib.sha256(f"bench-projection-{dim}".encode()).hexdigest()
        rng = np.random.default_rng(0)
        self._matrix = rng.standard_normal((16 * 16 * 3, dim)).astype(np.float32)

    def embed(self, images, batch_size: int = 32) -> np.ndarray:
        pixels = np.stack(
            [
                np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32).reshape(-1)
                for image in images
            ]
        )
        vectors = pixels / 255.0 @ self._matrix
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors.astype(np.float32)


def fill(lab, n: int, chunk: int = 20_000) -> float:
    """Store ``n`` random unit vectors as embeddings of ``n`` image rows (no blobs: bench only).

    The rows are the store's own (its models, ``embeddings.vector_to_blob``, the lab's session),
    written by executemany: ``engine.insert_ignore`` builds one multi-VALUES statement a call,
    whose compilation costs about 0.7 ms a row, 5 minutes for 200,000 images and embeddings.
    """
    from sqlalchemy import insert

    from resynth_index.store import embeddings
    from resynth_index.store.models import EmbeddingRow, ImageRow, utcnow

    start = time.perf_counter()
    rng = np.random.default_rng(7)
    now = utcnow()
    for first in range(0, n, chunk):
        count = min(chunk, n - first)
        images = [
            {
                "sha256": hashlib.sha256(b"filler %d" % (first + i)).hexdigest(),
                "blob_path": "filler",
                "size_bytes": 0,
                "format": "PNG",
                "width": 1,
                "height": 1,
                "created_at": now,
            }
            for i in range(count)
        ]
        block = rng.standard_normal((count, lab.settings.embedder_dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        with lab.session() as session:
            session.execute(insert(ImageRow), images)
            image_ids = embeddings.images_without_embedding(session, lab.fingerprint)
            assert len(image_ids) == count, (len(image_ids), count)
            rows = [
                {
                    "image_id": image_id,
                    "embedder_fingerprint": lab.fingerprint,
                    "dim": lab.settings.embedder_dim,
                    "vector": embeddings.vector_to_blob(vector),
                    "created_at": now,
                }
                for image_id, vector in zip(image_ids, block, strict=True)
            ]
            session.execute(insert(EmbeddingRow), rows)
    with lab.session() as session:
        assert embeddings.embedding_stats(session, lab.fingerprint)[0] == n
    return time.perf_counter() - start


def make_lab(root: Path, model: ProjectionEmbedder, filler: int) -> dict:
    """A lab holding ``filler`` synthetic vectors, three toy generators and their resyntheses of
    CAPTION (made by a warm-up query), with its index synced. Returns what it took."""
    from resynth_index.lab import Lab
    from resynth_index.models.embedders import EmbedderSpec
    from resynth_index.pipeline.query import run_queries

    spec = EmbedderSpec(arch="bench-projection", weights="stub:projection")
    with Lab.create_with_embedder(root, spec, model, device="cpu") as lab:
        filled = fill(lab, filler)
        for name, seed in TOY_GENERATORS:
            lab.add_toy_generator(name, seed, resyntheses=8)
    warmup = query_images(root / "queries", 1, offset=999)[0]
    with Lab.open(root, device="cpu", embedder=model) as lab:
        [answer] = run_queries(lab, [warmup], caption=CAPTION)
        assert answer.generated == 3 * 8, answer
        start = time.perf_counter()
        lab.sync_index()
        synced = time.perf_counter() - start
        count = lab.index.count
    size = lab.index_path.stat().st_size
    return {"filled_s": filled, "sync_s": synced, "vectors": count, "bytes": size}


def query_images(folder: Path, n: int, offset: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(offset + i)
        path = folder / f"q{offset + i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def after(root: Path, model: ProjectionEmbedder, image: Path) -> None:
    """`rsx query IMAGE --caption ...` as the CLI runs it now (the model already loaded)."""
    from resynth_index.lab import Lab
    from resynth_index.pipeline.query import run_queries

    with Lab.open(root, device="cpu", embedder=model) as lab:
        before = os.stat(lab.index_path)
        [answer] = run_queries(lab, [image], caption=CAPTION)
        assert answer.generated == 0 and answer.reused == 3 * 8, answer
        assert lab.loaded_index() is None  # never opened
        now = os.stat(lab.index_path)
        assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not written


def before(root: Path, model: ProjectionEmbedder, image: Path) -> None:
    """The same query as the CLI ran it before: the index opened (read, hashed, parsed) to read
    the vectors, and synced (rewritten, fsynced) at the end."""
    from resynth_index.lab import Lab
    from resynth_index.pipeline.query import run_queries

    with Lab.open(root, device="cpu", embedder=model) as lab:
        _ = lab.index
        [answer] = run_queries(lab, [image], caption=CAPTION)
        assert answer.generated == 0 and answer.reused == 3 * 8, answer
        assert lab.sync_index().written


def timed_queries(root: Path, model, images: list[Path]) -> dict[str, list[float]]:
    """The first half of ``images`` queried the new way, then the second half the old way.

    Blocks, not turns: the old path reads and rewrites the whole index file, which evicts the
    database's pages from the OS cache, so a new-path query right after one would pay for its
    neighbour's reads; a CLI user who only queries keeps those pages warm.
    """
    from resynth_index.lab import Lab

    times: dict[str, list[float]] = {"after": [], "before": []}
    half = len(images) // 2
    for number, image in enumerate(images):
        name = "after" if number < half else "before"
        if name == "before":  # untimed: the old path found the index synced by the last query
            with Lab.open(root, device="cpu", embedder=model) as lab:
                lab.sync_index()
        start = time.perf_counter()
        (after if name == "after" else before)(root, model, image)
        times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=10, help="filler vectors of the small lab")
    parser.add_argument("--large", type=int, default=200_000, help="... of the large lab")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=5, help="timed queries per path and lab")
    parser.add_argument("--scratch", type=Path, help="work folder (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (toy generation)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="rsx-scale-", dir=args.scratch))
    model = ProjectionEmbedder(args.dim)
    results = {}
    try:
        for label, filler in (("small", args.small), ("large", args.large)):
            root = scratch / f"lab-{label}"
            facts = make_lab(root, model, filler)
            print(
                f"{label}: {facts['vectors']:,} vectors of dim {args.dim}, index"
                f" {facts['bytes'] / 2**20:.1f} MiB; filled in {facts['filled_s']:.1f} s,"
                f" index built in {facts['sync_s']:.1f} s",
                flush=True,
            )
            images = query_images(scratch / f"q-{label}", 2 * args.queries + 2)
            timed_queries(root, model, images[:2])  # warm: imports, first connects, page cache
            times = timed_queries(root, model, images[2:])
            results[label] = (facts, times)
            shutil.rmtree(root)  # the large lab's disk back before the next
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(results, args)


def report(results: dict, args) -> None:
    """The table: per path, the median (and least) time of a query at each N, and the growth."""
    small, large = results["small"], results["large"]
    rows = [["path", f"N={small[0]['vectors']:,}", f"N={large[0]['vectors']:,}",
             "difference (median / least)", "ratio", "<= +50 ms"]]  # fmt: skip
    for name, label in (("after", "after: vectors by id"), ("before", "before: open + save")):
        a, b = (statistics.median(r[1][name]) * 1000 for r in (small, large))
        low_a, low_b = (min(r[1][name]) * 1000 for r in (small, large))
        rows.append(
            [
                label,
                f"{a:.1f} ms",
                f"{b:.1f} ms",
                f"{b - a:+.1f} ms / {low_b - low_a:+.1f} ms",
                f"{b / a:.2f}",
                "yes" if b - a <= 50 else "no",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for number, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if number == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(
        f"\nmedians of {args.queries} queries per cell (one new image each, the model already"
        f" loaded), dim {args.dim}, index file {large[0]['bytes'] / 2**20:.0f} MiB at the large N"
    )


if __name__ == "__main__":
    main()
