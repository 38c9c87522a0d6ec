"""Performance benchmark: each row is a ratio of two timings measured in the same run.

Rows:
  generation  batched vs one-at-a-time generation of the same resyntheses (toy zoo on the CPU;
              an SD1.5-size UNet/VAE/text encoder with random weights too when CUDA is present)
  ingest      ingest throughput (files -> blobs, rows, embeddings) vs the embedder's bare forward
              throughput at the same batch size (toy embedder; ViT-B-32 with random weights)
  query       one warm query (models loaded, resyntheses cached, library API) vs one embedding
              forward of one image, on a lab holding N stored vectors (synthetic ones fill it);
              plus the lookup alone (a gather of the query's few dozen candidates)
  resynthesize  ``resynthesize`` in process (generation, then each batch stored and embedded: the
              product's own loop, models loaded) vs bare ``generate`` on the same generator at the
              same batch, in interleaved rounds (toy zoo on the CPU)
  ray         toy-zoo generation through the Ray executor (2 actors) vs the local executor, the
              same work in one process each way (scripts/bench_ray.py --in-process-only): warm,
              the actors up (a running pool's throughput; the target), and cold, starting them
  startup     `rsx --help` wall time
  CLI rows    `rsx resynthesize`, `rsx ingest`, `rsx query` as users run them (a fresh process
              each, two work sizes): the per-image cost against the bare operation at the same
              batch (generate_images; the embedder's forward; one warm forward), and the one-off
              cost per command (start, imports, model load) as its own row (scripts/bench_cli.py)

Usage:
  .venv/bin/python scripts/bench.py            # full sizes (a few minutes; 1M vectors ~ 4 GB disk)
  .venv/bin/python scripts/bench.py --quick    # small sizes, toy embedder only (a smoke test)
  .venv/bin/python scripts/bench.py --vectors 2000 --skip-cli   # no 1M lab, no CLI rows

Nothing is downloaded: ViT-B-32 uses random weights (``random:0``), the toy zoo is built here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cli import cli_rows  # noqa: E402
from bench_common import (  # noqa: E402
    Row,
    bench_embedder,
    bench_help,
    load_embedder,
    make_lab,
    print_report,
    print_row,
    timed,
)


# ------------------------------------------------------------------------------ generation
def bench_generation(n: int, batch: int, repeat: int) -> Row:
    from resynth_index.models.generators.diffusers import generate_images
    from resynth_index.models.generators.protocol import GenerationRequest
    from resynth_index.models.toyzoo.pipelines import TOY_SETTINGS, build_toy_pipeline

    pipe = build_toy_pipeline(11)
    requests = [GenerationRequest(f"caption {i % 3}", i) for i in range(n)]
    generate_images(pipe, requests[:batch], TOY_SETTINGS, batch_size=batch)  # warm-up
    one = timed(lambda: generate_images(pipe, requests, TOY_SETTINGS, batch_size=1), repeat)
    many = timed(lambda: generate_images(pipe, requests, TOY_SETTINGS, batch_size=batch), repeat)
    ratio = one / many
    return Row(
        f"generation toy, batch {batch} vs 1 ({n} images, CPU)",
        f"{n / many:.1f} img/s",
        f"{n / one:.1f} img/s",
        ratio,
        ">= 1.2x",
        ratio >= 1.2,
    )


def bench_resynthesize(scratch: Path, n: int, batch: int, rounds: int) -> Row:
    """``resynthesize`` of ``n`` fresh captions against ``generate`` of ``n`` requests on the same
    loaded toy generator, alternating, ``rounds`` times: medians of the per-image times, so a
    change of machine load hits both sides (the CLI rows add a fresh process to each side)."""
    import statistics
    import time

    from resynth_index.models.generators.protocol import GenerationRequest
    from resynth_index.pipeline import resynthesis

    spec, model = load_embedder("toy", scratch)
    lab = make_lab(scratch / "lab-resynthesize", spec, model)
    row = lab.add_toy_generator("toy-a", 11, resyntheses=1)
    generator = lab.generator_model(row)
    requests = [GenerationRequest(f"bare, a photograph of subject {i}", i) for i in range(n)]
    generator.generate(requests[:batch], batch_size=batch)  # load + warm-up
    bare, product = [], []
    for round_ in range(rounds):
        bare.append(timed(lambda: generator.generate(requests, batch_size=batch)) / n)
        texts = [f"round {round_}, a photograph of subject {i}" for i in range(n)]
        start = time.perf_counter()
        summary = resynthesis.resynthesize(
            lab, resynthesis.captions_by_hash(texts), [row], batch_size=batch
        )
        product.append((time.perf_counter() - start) / n)
        assert summary.generated == n, summary
    lab.close()
    per_bare, per_product = statistics.median(bare), statistics.median(product)
    ratio = per_bare / per_product
    return Row(
        f"resynthesize in process, toy zoo, batch {batch} ({n} images x {rounds} rounds)",
        f"{1 / per_product:.1f} img/s",
        f"{1 / per_bare:.1f} img/s bare generate",
        ratio,
        ">= 0.85",
        ratio >= 0.85,
    )


def bench_generation_sd15_cuda(n: int, batch: int) -> Row | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from gpu_bench import bench_generation_arch  # the SD1.5 sizes live with the GPU rows

    return bench_generation_arch("sd15", n=n, batch=batch, tiny=False)


# ------------------------------------------------------------------------------ CLI rows
def bench_cli_cpu(scratch: Path, quick: bool, embedders: list[str], threads: int | None):
    """The product-path rows (scripts/bench_cli.py) on the CPU: the toy zoo's generator and
    embedder for all three commands; ViT-B-32 (random weights) for ingest and query too."""

    def toy_generator(lab):
        return lab.add_toy_generator("toy-a", 11, resyntheses=1)

    found = cli_rows(
        scratch,
        kind="toy",
        add_generator=toy_generator,
        label="toy zoo 64px",
        gen_batch=4,
        gen_sizes=(4, 12) if quick else (8, 56),
        ingest_batch=16 if quick else 32,
        ingest_sizes=(16, 48) if quick else (32, 288),
        image_size=64,
        query_sizes=(1, 5) if quick else (2, 18),
        repeat=1 if quick else 2,
        threads=threads,
        gen_target=None if quick else 0.85,  # a smoke run's sizes are within start-up noise
    )
    for kind in embedders:
        if kind != "toy":
            found += cli_rows(
                scratch,
                kind=kind,
                add_generator=toy_generator,
                label=kind,
                gen_batch=4,
                gen_sizes=(4, 8),
                ingest_batch=32,
                # 192 images between the two runs (about 8 s of forward): start-up jitter of a
                # second moved the 32->96 slope by a third (0.69, 1.10, 1.34 in one session)
                ingest_sizes=(32, 224),
                image_size=256,
                query_sizes=(2, 26),
                repeat=2,
                threads=threads,
                embed_target=0.9,  # issue 12's CPU target for ViT-B-32 ingest
                commands=("ingest", "query"),
            )
    return found


# ------------------------------------------------------------------------------ main
def bench_ray(quick: bool) -> list[Row]:
    """The Ray rows, from ``scripts/bench_ray.py`` run in a process of its own (it holds every
    process to one compute thread); none, with a line saying why, without the [scale] extra."""
    import importlib.util
    import json
    import subprocess

    if importlib.util.find_spec("ray") is None:
        print("ray rows skipped: ray is not installed (pip install -e '.[scale]')", flush=True)
        return []
    script = Path(__file__).resolve().parent / "bench_ray.py"
    command = [sys.executable, str(script), "--in-process-only", "--json"]
    command += ["--captions", "8" if quick else "24", "--actors", "2"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_ray.py failed:\n{done.stdout}{done.stderr}")
    found = {row["name"]: row for row in json.loads(done.stdout.strip().splitlines()[-1])}
    rows = []
    for run, target in (("warm", "<= 1.2x"), ("cold", "(report)")):
        local, ray = found[f"in process, local ({run})"], found[f"in process, ray x2 ({run})"]
        what = "actors up" if run == "warm" else "starting 2 actors"
        rows.append(
            Row(
                f"generation toy through Ray x2, {run} ({what}; {ray['images']} images)",
                f"{ray['seconds']:.2f} s",
                f"{local['seconds']:.2f} s local",
                ray["ratio"],
                target,
                ray["ratio"] <= 1.2 if run == "warm" else None,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, toy embedder only")
    parser.add_argument("--vectors", type=int, help="stored vectors in the query lab")
    parser.add_argument("--keep", type=Path, help="build the labs here and keep them")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-cli", action="store_true", help="leave out the CLI rows")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the Ray rows")
    args = parser.parse_args(argv)

    quick = args.quick
    vectors = args.vectors if args.vectors is not None else (2_000 if quick else 1_000_000)
    embedders = ["toy"] if quick else ["toy", "ViT-B-32"]
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="rsx-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"rsx bench: {os.cpu_count()} CPU(s), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {load[0]:.2f} at start",
        flush=True,
    )
    rows: list[Row] = []
    notes: list[str] = []
    try:
        rows.append(bench_generation(n=4 if quick else 16, batch=4, repeat=1 if quick else 2))
        print_row(rows[-1])
        rows.append(
            bench_resynthesize(scratch, n=8 if quick else 32, batch=4, rounds=1 if quick else 3)
        )
        print_row(rows[-1])
        gpu = None if quick else bench_generation_sd15_cuda(n=16, batch=16)
        if gpu is not None:
            rows.append(gpu)
        for kind in embedders:
            found, note = bench_embedder(
                kind,
                scratch,
                size=64 if kind == "toy" else 256,
                n=(48 if quick else 512) if kind == "toy" else 256,
                batch=16 if quick else 32,
                vectors=vectors if kind != "toy" or quick else min(vectors, 100_000),
                k=2 if quick else 8,
                queries=3 if quick else 10,
                ingest_target=0.9,  # issue 12's target on this 2-core CPU (0.8 on a GPU)
            )
            rows.extend(found)
            notes.append(note)
        if not args.skip_ray:
            for row in bench_ray(quick):
                rows.append(row)
                print_row(row)
        rows.append(bench_help(3 if quick else 7))
        print_row(rows[-1])
        if not args.skip_cli:
            rows.extend(bench_cli_cpu(scratch, quick, embedders, args.threads))
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    load = os.getloadavg()
    print_report(rows, notes)
    print(f"load average at end: {load[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
