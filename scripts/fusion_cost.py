#!/usr/bin/env python3
"""What ``rsx query --method fused`` costs next to the default ``--method resynthesis`` (toy lab).

Each row is timed both ways in the same run, on copies of one toy lab (toy embedder, three toy
generators), the two methods alternating so that drift in the machine's load hits both:

- cold query, fresh process: ``rsx query IMG --caption NEW`` in a new process, so the resyntheses
  are generated (the pipelines load, which lends fused their autoencoders);
- warm query, fresh process: a second image with the same caption (every resynthesis reused);
  fused loads the three autoencoders and reconstructs the image through each;
- warm query, in process: ``run_queries`` on an open lab with everything loaded; fused adds the
  reconstruction itself, timed alone on the last line for comparison.

Usage:
    python scripts/fusion_cost.py [--repeats 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GENERATORS = {"toy-a": 11, "toy-b": 22, "toy-c": 33}
COLD_TARGET = 1.10  # fused may add at most 10 % to a cold query


def build_template(root: Path, images: int) -> list[Path]:
    """A toy lab at ``root`` and ``images`` query images made by toy-b (seeds 5000...)."""
    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import GenerationRequest

    with Lab.create(root, embedder="toy") as lab:
        for name, seed in GENERATORS.items():
            lab.add_toy_generator(name, seed)
        row = next(r for r in lab.generators() if r.name == "toy-b")
        made = lab.generator_model(row).generate(
            [GenerationRequest("a query image", 5000 + i) for i in range(images)]
        )
    paths = []
    for i, image in enumerate(made):
        paths.append(root.parent / f"query-{i}.png")
        image.save(paths[-1])
    return paths


def timed_query(lab: Path, image: Path, caption: str, method: str) -> float:
    """Wall time of one ``rsx query`` in a fresh process."""
    command = [sys.executable, "-m", "resynth_index", "--lab", str(lab), "query", str(image)]
    command += ["--caption", caption, "--method", method, "--json"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, help="Scratch folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="rsx-fusion-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    template = work / "template"
    shutil.rmtree(template, ignore_errors=True)
    images = build_template(template, 2 * args.repeats + 8)
    times: dict[tuple[str, str], list[float]] = {}
    methods = ("resynthesis", "fused")
    for rep in range(args.repeats):
        caption = f"a lighthouse at dusk, study {rep}"
        order = methods if rep % 2 == 0 else methods[::-1]
        for method in order:
            lab = work / f"lab-{rep}-{method}"
            shutil.rmtree(lab, ignore_errors=True)
            shutil.copytree(template, lab)
            cold = timed_query(lab, images[2 * rep], caption, method)
            warm = timed_query(lab, images[2 * rep + 1], caption, method)
            times.setdefault(("cold", method), []).append(cold)
            times.setdefault(("warm-process", method), []).append(warm)
            print(f"repeat {rep} {method}: cold {cold:.2f} s, warm {warm:.2f} s", flush=True)
    in_process, reconstruction = _in_process(work, template, images[2 * args.repeats :])
    times.update(in_process)
    rows = [
        ("cold query, fresh process (3 generations)", "cold", COLD_TARGET),
        ("warm query, fresh process (all reused)", "warm-process", None),
        ("warm query, in process (all reused)", "warm-library", None),
    ]
    print(f"\nmedian of {args.repeats} (processes) or 4 (in process) runs; load: {_load()}")
    print("| row | resynthesis | fused | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    for label, key, target in rows:
        base = statistics.median(times[(key, "resynthesis")])
        fused = statistics.median(times[(key, "fused")])
        ratio = fused / base
        goal = f"<= {target:.2f}x" if target else "(report)"
        met = ("yes" if ratio <= target else "no") if target else "-"
        print(f"| {label} | {base:.3f} s | {fused:.3f} s | {ratio:.2f} | {goal} | {met} |")
    print(
        f"| reconstruction alone (3 autoencoders, 1 image, loaded) | | {reconstruction:.3f} s"
        " | | | |"
    )


def _in_process(work: Path, template: Path, images: list[Path]):
    """Warm queries in one process (everything loaded), alternating the methods; and the
    reconstruction of one new image through the three loaded autoencoders, alone."""
    import hashlib

    from PIL import Image

    from resynth_index.attribution.evidence.reconstruction import query_reconstruction, scorer_for
    from resynth_index.lab import Lab
    from resynth_index.pipeline.query import run_queries

    lab_dir = work / "lab-in-process"
    shutil.rmtree(lab_dir, ignore_errors=True)
    shutil.copytree(template, lab_dir)
    caption = "a lighthouse at dusk, in process"
    times: dict[tuple[str, str], list[float]] = {}
    with Lab.open(lab_dir) as lab:
        run_queries(lab, [images[0]], caption=caption, method="fused")  # generate, load all
        for i, image in enumerate(images[1:]):
            method = ("resynthesis", "fused")[i % 2]
            started = time.perf_counter()
            run_queries(lab, [image], caption=caption, method=method)
            times.setdefault(("warm-library", method), []).append(time.perf_counter() - started)
        picture = Image.open(images[0]).convert("RGB").rotate(180)  # not reconstructed yet
        sha = hashlib.sha256(picture.tobytes()).hexdigest()
        started = time.perf_counter()
        query_reconstruction(lab, lab.generators(), [(sha, picture)], scorer_for(lab))
        alone = time.perf_counter() - started
    return times, alone


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
