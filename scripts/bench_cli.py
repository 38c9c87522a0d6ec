"""Benchmark rows of the product path: ``rsx resynthesize``, ``rsx ingest`` and ``rsx query`` as
users run them, through the CLI in a fresh process, each against the bare operation at the same
batch size measured in the same run.

Method. Each command runs as a subprocess (the ``rsx`` console script beside this Python, else
``python -m resynth_index``) at two work sizes n1 < n2, on fresh input each time (new captions, new
images), so nothing is cached or skipped. With t1, t2 the wall times (best of ``repeat``):

    per item  = (t2 - t1) / (n2 - n1)        the steady-state cost of one more image
    one-off   = t1 - n1 * per item           start-up: imports, lab open, model loads, final sync

The bare operation is timed in this process after each round of CLI runs (best of them), so a
change of machine load during the run hits both sides.

The per-item row compares throughput with the bare operation: ``generate_images`` at the same batch
on the same pipeline (resynthesize), the embedder's ``embed_tensors`` forward at the same batch
(ingest), one warm single-image forward (query). Ratio = CLI throughput / bare throughput. The
one-off row shows the fixed cost and its share of the n2 run.

``scripts/bench.py`` (CPU, toy zoo) and ``scripts/gpu_bench.py`` (SD1.5 on CUDA) both call
``cli_rows``; this file has no ``main``.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bench_common as bench
import numpy as np

_RUN = itertools.count()  # a fresh tag per CLI run: new captions, new images


def rsx_command() -> list[str]:
    """How users start rsx: the console script installed beside this Python, else ``-m``."""
    script = Path(sys.executable).with_name("rsx")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "resynth_index"]


def run_rsx(lab: Path, args: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``rsx --lab LAB ARGS`` in a fresh process; (wall seconds, stdout). Fails loudly."""
    command = [*rsx_command(), "--lab", str(lab), *args]
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=bench.ROOT, env=env or os.environ.copy()
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return elapsed, done.stdout


@dataclass
class Fit:
    """Two timed sizes and what they say: cost per item and the one-off cost."""

    n1: int
    t1: float
    n2: int
    t2: float

    @property
    def per_item(self) -> float:
        return (self.t2 - self.t1) / (self.n2 - self.n1)

    @property
    def one_off(self) -> float:
        return self.t1 - self.n1 * self.per_item


def fit_sizes(
    run: Callable[[int], float],
    n1: int,
    n2: int,
    repeat: int,
    bare: Callable[[], float] | None = None,
) -> tuple[Fit, float]:
    """Time ``run(n)`` (fresh work each call) at n1 and n2, best of ``repeat`` each, and
    ``bare()`` (seconds per item) after each round, best of them: interleaved, so a change of
    machine load hits both sizes and the bare operation alike. (fit, bare seconds per item)."""
    best = {n1: float("inf"), n2: float("inf")}
    bare_best = float("inf")
    for _ in range(repeat):
        for n in (n1, n2):
            best[n] = min(best[n], run(n))
        if bare is not None:
            bare_best = min(bare_best, bare())
    return Fit(n1, best[n1], n2, best[n2]), bare_best


def fit_rows(
    command: str, label: str, fit: Fit, bare_per_item: float, bare: str, target: float | None
) -> list[bench.Row]:
    """The per-item row (against the bare operation) and the one-off row of one command."""
    per_item = fit.per_item
    name = f"rsx {command} CLI {label}, per image ({fit.n1}->{fit.n2} images)"
    wanted = f">= {target:.2f}" if target is not None else "(report)"
    if per_item <= 0:  # the larger run was not slower: noise (machine load) swamped the work
        first = bench.Row(
            name,
            f"unresolved: t{fit.n2} {fit.t2:.2f} s <= t{fit.n1} {fit.t1:.2f} s",
            f"{1 / bare_per_item:.1f} img/s {bare}",
            float("nan"),
            wanted,
            None,
        )
        return [first]
    ratio = bare_per_item / per_item
    return [
        bench.Row(
            name,
            f"{1 / per_item:.1f} img/s",
            f"{1 / bare_per_item:.1f} img/s {bare}",
            ratio,
            wanted,
            ratio >= target if target is not None else None,
        ),
        bench.Row(
            f"rsx {command} CLI {label}, one-off (start, imports, model load)",
            f"{fit.one_off:.2f} s",
            f"of {fit.t2:.2f} s at {fit.n2}",
            fit.one_off / fit.t2,
            "(report)",
            None,
        ),
    ]


def noise_images(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    """``n`` distinct PNGs (random content from ``seed``): never already stored."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        picture = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(picture).save(paths[-1], compress_level=1)
    return paths


# ------------------------------------------------------------------------------ resynthesize
def bench_resynthesize_cli(
    lab_root: Path,
    row,
    *,
    label: str,
    batch: int,
    sizes: tuple[int, int],
    repeat: int,
    scratch: Path,
    env: dict[str, str] | None = None,
    target: float | None = 0.85,
) -> list[bench.Row]:
    """``rsx resynthesize --captions FILE --generator NAME --batch-size B`` at two sizes, fresh
    captions each run (K = 1: one image per caption), against ``generate_images`` at batch B on
    the same pipeline in this process."""
    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import GenerationRequest

    def run(n: int) -> float:
        tag = next(_RUN)
        captions = scratch / f"captions-{tag}.txt"
        captions.write_text(
            "\n".join(f"bench run {tag}, a photograph of subject {i}" for i in range(n)),
            encoding="utf-8",
        )
        args = ["resynthesize", "--captions", str(captions), "--generator", row.name]
        elapsed, out = run_rsx(lab_root, [*args, "--batch-size", str(batch), "--json"], env)
        summary = json.loads(out)
        assert summary["generated"] == n and summary["reused"] == 0, summary
        assert summary["batch_sizes"] == {row.name: batch}, summary
        return elapsed

    with Lab.open(lab_root) as lab:  # the bare operation: the same pipeline, same batch
        model = lab.generator_model(lab_row(lab, row.name))
        extra = sizes[1] - sizes[0]
        requests = [GenerationRequest(f"bare, a photograph of {i}", i) for i in range(extra)]
        model.generate(requests[:batch], batch_size=batch)  # load + warm-up

        def bare_generate() -> float:
            return bench.timed(lambda: model.generate(requests, batch_size=batch)) / extra

        fit, bare = fit_sizes(run, *sizes, repeat, bare_generate)
    return fit_rows("resynthesize", f"{label}, batch {batch}", fit, bare, "bare generate", target)


def lab_row(lab, name: str):
    return next(r for r in lab.generators() if r.name == name)


# ------------------------------------------------------------------------------ ingest
def bench_ingest_cli(
    lab_root: Path,
    model,
    *,
    label: str,
    batch: int,
    sizes: tuple[int, int],
    image_size: int,
    repeat: int,
    scratch: Path,
    env: dict[str, str] | None = None,
    target: float | None = None,
) -> list[bench.Row]:
    """``rsx ingest FOLDER --batch-size B`` of fresh PNGs at two sizes, against the embedder's
    ``embed_tensors`` forward at batch B (pixels preprocessed beforehand), in this process."""
    from PIL import Image

    def run(n: int) -> float:
        tag = next(_RUN)
        folder = scratch / f"ingest-{tag}"
        noise_images(folder, n, image_size, seed=10_000 + tag)
        elapsed, out = run_rsx(lab_root, ["ingest", str(folder), "--batch-size", str(batch)], env)
        assert f"ingest: {n} added, 0 skipped" in out, out
        return elapsed

    paths = noise_images(scratch / "ingest-bare", batch * 2, image_size, seed=1)
    pixels = model.preprocess_batch([Image.open(p).convert("RGB") for p in paths])
    model.embed_tensors(pixels[:batch])  # warm-up

    def bare_forward() -> float:
        return bench.timed(
            lambda: [
                model.embed_tensors(pixels[s : s + batch]) for s in range(0, len(pixels), batch)
            ],
            repeat=2,
        ) / len(pixels)

    fit, forward = fit_sizes(run, *sizes, repeat, bare_forward)
    return fit_rows("ingest", f"{label}, batch {batch}", fit, forward, "forward", target)


# ------------------------------------------------------------------------------ query
def bench_query_cli(
    lab_root: Path,
    model,
    *,
    label: str,
    sizes: tuple[int, int],
    image_size: int,
    repeat: int,
    scratch: Path,
    env: dict[str, str] | None = None,
    target: float | None = None,
) -> list[bench.Row]:
    """``rsx query IMAGES --caption C --no-generate --json`` of fresh images at two sizes (their
    caption's resyntheses already stored, so a query embeds and compares), against one warm
    single-image forward of the embedder in this process."""
    from PIL import Image

    def run(n: int) -> float:
        tag = next(_RUN)
        paths = noise_images(scratch / f"query-{tag}", n, image_size, seed=20_000 + tag)
        args = ["query", *map(str, paths), "--caption", bench.QUERY_CAPTION, "--no-generate"]
        elapsed, out = run_rsx(lab_root, [*args, "--json"], env)
        answers = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert len(answers) == n, out
        return elapsed

    [path] = noise_images(scratch / "query-bare", 1, image_size, seed=2)
    picture = Image.open(path).convert("RGB")
    model.embed([picture], batch_size=1)  # warm-up

    def bare_forward() -> float:
        return statistics.median(
            [bench.timed(lambda: model.embed([picture], batch_size=1)) for _ in range(5)]
        )

    fit, forward = fit_sizes(run, *sizes, repeat, bare_forward)
    return fit_rows("query", label, fit, forward, "one forward", target)


# ------------------------------------------------------------------------------ all three
def cli_rows(
    scratch: Path,
    *,
    kind: str,
    add_generator: Callable,
    label: str,
    gen_batch: int,
    gen_sizes: tuple[int, int],
    ingest_batch: int,
    ingest_sizes: tuple[int, int],
    image_size: int,
    query_sizes: tuple[int, int],
    repeat: int,
    device: str = "cpu",
    threads: int | None = None,
    embed_target: float | None = None,
    gen_target: float | None = 0.85,
    commands: tuple[str, ...] = ("resynthesize", "ingest", "query"),
) -> list[bench.Row]:
    """The product-path rows on a lab with embedder ``kind`` and the generator that
    ``add_generator(lab)`` registers (it returns the row), each row printed when measured.

    ``threads``: the torch threads the CLI processes use (OMP_NUM_THREADS), as this one does.
    ``commands``: which of the three to measure. ``embed_target``: the ingest and query rows'
    target (None: reported only, as for the toy embedder, whose forward is too cheap to hide the
    pipeline's fixed costs). ``gen_target``: the resynthesize row's (None: reported only, for
    work sizes too small to rise above the noise of a process start, as in a smoke run).
    """
    from resynth_index.lab import Lab
    from resynth_index.pipeline import resynthesis

    scratch = scratch / f"cli-{kind}"
    scratch.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    spec, model = bench.load_embedder(kind, scratch, device=device)
    root = scratch / "lab"
    lab = bench.make_lab(root, spec, model, device)
    row = add_generator(lab)
    if "query" in commands:  # the query caption's resyntheses, stored now: queries only compare
        resynthesis.resynthesize(lab, resynthesis.captions_by_hash([bench.QUERY_CAPTION]), [row])
    lab.close()
    rows: list[bench.Row] = []
    measured = {
        "resynthesize": lambda: bench_resynthesize_cli(
            root,
            row,
            label=label,
            batch=gen_batch,
            sizes=gen_sizes,
            repeat=repeat,
            scratch=scratch,
            env=env,
            target=gen_target,
        ),
        "ingest": lambda: bench_ingest_cli(
            root,
            model,
            label=kind,
            batch=ingest_batch,
            sizes=ingest_sizes,
            image_size=image_size,
            repeat=repeat,
            scratch=scratch,
            env=env,
            target=embed_target,
        ),
        "query": lambda: bench_query_cli(
            root,
            model,
            label=kind,
            sizes=query_sizes,
            image_size=image_size,
            repeat=repeat,
            scratch=scratch,
            env=env,
            target=embed_target,
        ),
    }
    for command in commands:
        for found in measured[command]():
            rows.append(found)
            bench.print_row(found)
    Lab.open(root, device=device, embedder=model).close()  # the lab still opens: nothing broke
    return rows
