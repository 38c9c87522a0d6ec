#!/usr/bin/env python3
"""Toy benchmark: the paper's protocol end to end on toy generators, in a few minutes on a CPU.

1. Builds a toy dataset in the paper's layout under OUT/dataset:
   ``Dataset/100people/images/<G>/000NN.png`` (originals, prompt in a sidecar ``000NN.txt``) and
   ``Dataset/100people/images/<G>/images/<R>/000NN.png`` (original NN of G resynthesised by R).
   The generators are not trivially separable: two families of two members that share a base
   model and differ by small weight perturbations, plus two unrelated models. Originals use seeds
   1000 + 100*g + NN (g: the generator's position; family members never share a starting noise);
   every resynthesis uses seed 7 (so R's resynthesis of caption NN is the same image
   whatever G's original it stands next to: the ingest stores it once).
2. ``rsx init`` a toy lab, ``rsx ingest --layout resynthesis-dataset`` (the generators arrive as
   imported ones, as for the real dataset), ``rsx eval`` without and with post-processing, each
   writing its report under OUT. With ``--conformal`` both evaluations also measure prediction
   sets (overall and per generator) and the calibration of the displayed score.

Usage:
    python scripts/toy_benchmark.py --out /tmp/rsx-toy-benchmark
    python scripts/toy_benchmark.py --out DIR --captions 12 --shots 1,5 --repeats 2 --perturb jpeg
    python scripts/toy_benchmark.py --out DIR --conformal 0.9,0.95
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: name -> (seed, base seed or None, weight perturbation relative to each tensor's spread)
TOY_GENERATORS = {
    "famA-1": (101, 1, 0.15),
    "famA-2": (102, 1, 0.15),
    "famB-1": (201, 2, 0.15),
    "famB-2": (202, 2, 0.15),
    "solo-3": (3, None, 0.0),
    "solo-4": (4, None, 0.0),
}
ORIGINAL_SEED = 1000
RESYNTHESIS_SEED = 7
WHO = (
    "an elderly fisherman",
    "a young violinist",
    "a smiling nurse",
    "a bearded farmer",
    "a teenage skater",
    "a retired teacher",
    "a chef",
    "a marathon runner",
    "a librarian",
    "a mountain guide",
    "a jazz singer",
    "a potter",
    "a firefighter",
)
HOW = (
    "soft window light",
    "overcast daylight",
    "studio lighting, grey backdrop",
    "golden hour",
    "neon night light",
)


def captions(count: int) -> list[str]:
    return [
        f"a head-and-shoulders portrait of {WHO[i % len(WHO)]}, {HOW[(i // 2) % len(HOW)]}"
        + (f", photo {i}" if i >= len(WHO) else "")
        for i in range(count)
    ]


def build_dataset(out: Path, n_captions: int, echo=print) -> Path:
    """Write the toy dataset in the paper's layout under ``out``; returns the dataset root."""
    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import GenerationRequest

    root = out / "dataset"
    images = root / "Dataset" / "100people" / "images"
    maker_dir = out / "maker-lab"  # the lab that holds (and runs) the toy generators
    shutil.rmtree(maker_dir, ignore_errors=True)
    texts = captions(n_captions)
    with Lab.create(maker_dir, embedder="toy") as maker:
        for name, (seed, base, perturbation) in TOY_GENERATORS.items():
            maker.add_toy_generator(name, seed, base_seed=base, perturbation=perturbation)
        rows = {row.name: row for row in maker.generators()}
        models = {name: maker.generator_model(rows[name]) for name in TOY_GENERATORS}
        resyntheses = {
            name: model.generate([GenerationRequest(t, RESYNTHESIS_SEED) for t in texts])
            for name, model in models.items()
        }
        for g, (name, model) in enumerate(models.items()):
            folder = images / name
            folder.mkdir(parents=True, exist_ok=True)
            originals = model.generate(
                [GenerationRequest(t, ORIGINAL_SEED + 100 * g + i) for i, t in enumerate(texts)]
            )
            for i, (text, image) in enumerate(zip(texts, originals, strict=True)):
                stem = f"{i + 1:05d}"
                image.save(folder / f"{stem}.png")
                (folder / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
                for maker_name, made in resyntheses.items():
                    target = folder / "images" / maker_name
                    target.mkdir(parents=True, exist_ok=True)
                    made[i].save(target / f"{stem}.png")
            echo(f"  {name}: {len(texts)} originals, {len(texts) * len(models)} resyntheses")
    shutil.rmtree(maker_dir, ignore_errors=True)
    return root


def rsx(lab: Path, *args: str) -> None:
    command = [sys.executable, "-m", "resynth_index", "--lab", str(lab), *args]
    print("$ rsx --lab", lab, *args, flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for dataset, lab, reports")
    parser.add_argument("--captions", type=int, default=25, help="Captions (originals per gen)")
    parser.add_argument("--shots", default="1,5,10,20")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--perturb", default="all", help="Operators for the perturbed run")
    parser.add_argument("--conformal", help="Also measure prediction sets, e.g. 0.9,0.95")
    parser.add_argument("--conformal-splits", type=int, default=500, help="Calibration splits")
    parser.add_argument(
        "--calibration-share",
        type=float,
        default=0.8,
        help="Share of each generator's references that calibrates (0.8 of 25 gives the 19"
        " per generator that 95 %% per-generator coverage needs)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    print(f"building the toy dataset ({len(TOY_GENERATORS)} generators, {args.captions} captions)")
    dataset = build_dataset(out, args.captions)
    built = time.perf_counter()
    lab = out / "lab"
    rsx(lab, "init")
    rsx(lab, "ingest", str(dataset), "--layout", "resynthesis-dataset")
    ingested = time.perf_counter()
    common = ["eval", "--shots", args.shots, "--repeats", str(args.repeats)]
    if args.conformal:
        common += ["--conformal", args.conformal, "--per-generator"]
        common += ["--conformal-splits", str(args.conformal_splits)]
        common += ["--calibration-share", str(args.calibration_share)]
    rsx(lab, *common, "--out", str(out / "report-clean"))
    rsx(lab, *common, "--perturb", args.perturb, "--out", str(out / "report-perturbed"))
    done = time.perf_counter()
    print(
        f"\ntimes: dataset {built - started:.0f} s, init+ingest {ingested - built:.0f} s, "
        f"both evaluations {done - ingested:.0f} s, total {done - started:.0f} s"
    )
    print(
        f"reports: {out / 'report-clean' / 'report.md'}, {out / 'report-perturbed' / 'report.md'}"
    )


if __name__ == "__main__":
    main()
