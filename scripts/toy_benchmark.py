#!/usr/bin/env python3
"""Toy benchmark: the paper's protocol end to end on toy generators, in a few minutes on a CPU.

1. Builds a toy dataset in the paper's layout under OUT/dataset:
   ``Dataset/100people/images/<G>/000NN.png`` (originals, prompt in a sidecar ``000NN.txt``) and
   ``Dataset/100people/images/<G>/images/<R>/000NN.png`` (original NN of G resynthesised by R).
   The generators are not trivially separable. Three families of look-alikes: ``famA`` and
   ``famB`` are two perturbed copies each of a shared base model (every weight nudged by 0.15 of
   its tensor's spread); ``famC`` is a base model and two "fine-tunes" of it, copies with small
   relative noise (``FINE_TUNE``) in the UNet, the autoencoder and the text encoder alike. Two
   unrelated models (``solo-*``) complete the set. Originals use seeds 1000 + 100*g + NN (g: the
   generator's position; family members never share a starting noise); every resynthesis uses
   seed 0 (so R's resynthesis of caption NN is the same image whatever G's original it stands
   next to: the ingest stores it once).
2. The lab (OUT/lab, toy embedder) registers the toy generators as runnable ones, so their
   autoencoders are there for the reconstruction signal, and ingests the dataset through a manifest
   (OUT/dataset/manifest.csv: originals as references, resyntheses with their seed). With
   ``--imported`` it ingests ``--layout resynthesis-dataset`` instead, as for the real dataset (the
   generators arrive as imported ones: no autoencoder, ``aeroblade`` has nothing to use).
3. ``rsx eval`` without and with post-processing, each writing its report under OUT, with the
   families declared (``--families``) so accuracy is reported within and across them. With
   ``--conformal`` both evaluations also measure prediction sets (overall and per generator) and
   the calibration of the displayed score.

Usage:
    python scripts/toy_benchmark.py --out /tmp/rsx-toy-benchmark
    python scripts/toy_benchmark.py --out DIR --captions 12 --shots 1,5 --repeats 2 --perturb jpeg
    python scripts/toy_benchmark.py --out DIR --conformal 0.9,0.95 --methods resynthesis
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: A fine-tune look-alike: relative weight noise in each component of its base model.
FINE_TUNE = {"unet": 0.05, "vae": 0.05, "text_encoder": 0.05}
#: name -> (seed, base seed or None, weight perturbation relative to each tensor's spread: one
#: scale for every component, or one per component)
TOY_GENERATORS: dict[str, tuple[int, int | None, float | dict[str, float]]] = {
    "famA-1": (101, 1, 0.15),
    "famA-2": (102, 1, 0.15),
    "famB-1": (201, 2, 0.15),
    "famB-2": (202, 2, 0.15),
    "solo-3": (3, None, 0.0),
    "solo-4": (4, None, 0.0),
    "famC-base": (5, None, 0.0),
    "famC-ft1": (501, 5, FINE_TUNE),
    "famC-ft2": (502, 5, FINE_TUNE),
}
#: The look-alike groups, as ``rsx eval --families`` takes them.
FAMILIES = "famA-1+famA-2,famB-1+famB-2,famC-base+famC-ft1+famC-ft2"
ORIGINAL_SEED = 1000
RESYNTHESIS_SEED = 0  # the first seed a lab asks a runnable generator for
METHODS = "resynthesis,knn,clip-svm,clip-logreg,clip-mlp,hybrid,aeroblade,fused,fused-loo"
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


def register_toys(lab) -> None:
    """Build and register every toy generator in ``lab`` (a per-component perturbation included;
    ``Lab.add_toy_generator`` takes one scale, so the pipeline is saved here and registered)."""
    from resynth_index.models.toyzoo.pipelines import TOY_SETTINGS, ensure_toy_pipeline

    for name, (seed, base, perturbation) in TOY_GENERATORS.items():
        folder = ensure_toy_pipeline(
            lab.root / "models" / f"toy-{name}", seed, base_seed=base, perturbation=perturbation
        )
        lab.add_generator(name, "toy", source=folder, settings=TOY_SETTINGS)


def build_dataset(out: Path, n_captions: int, lab_dir: Path, echo=print) -> Path:
    """Write the toy dataset in the paper's layout under ``out`` and a manifest of it, made by the
    toy generators registered in a new lab at ``lab_dir``; returns the dataset root."""
    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import GenerationRequest

    root = out / "dataset"
    images = root / "Dataset" / "100people" / "images"
    texts = captions(n_captions)
    manifest = ["path,role,generator,caption,seed"]
    with Lab.create(lab_dir, embedder="toy") as maker:
        register_toys(maker)
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
                manifest.append(_csv_row(folder / f"{stem}.png", root, "reference", name, text))
                for maker_name, made in resyntheses.items():
                    target = folder / "images" / maker_name
                    target.mkdir(parents=True, exist_ok=True)
                    made[i].save(target / f"{stem}.png")
                    if g == 0:  # one resynthesis per (maker, caption): listed once
                        manifest.append(
                            _csv_row(
                                target / f"{stem}.png", root, "resynthesis", maker_name, text,
                                RESYNTHESIS_SEED,
                            )
                        )  # fmt: skip
            echo(f"  {name}: {len(texts)} originals, {len(texts) * len(models)} resyntheses")
    (root / "manifest.csv").write_text("\n".join(manifest) + "\n", encoding="utf-8")
    return root


def _csv_row(
    path: Path, root: Path, role: str, generator: str, caption: str, seed: int | None = None
) -> str:
    """One manifest line (CSV; the captions hold commas, so they are quoted)."""
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(
        [path.relative_to(root).as_posix(), role, generator, caption, "" if seed is None else seed]
    )
    return buffer.getvalue()


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
    parser.add_argument(
        "--perturb",
        default="jpeg,resize,social",
        help="Operators for the perturbed run ('all' for every one: slow with the fusion methods)",
    )
    parser.add_argument("--methods", default=METHODS, help="Methods of both evaluations")
    parser.add_argument(
        "--fusion-layers",
        default="1,2,3",
        help="Toy embedder blocks added as signals of fused-loo ('' for none)",
    )
    parser.add_argument(
        "--imported",
        action="store_true",
        help="Ingest the paper layout with the generators as imported ones (no autoencoders)",
    )
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
    lab = out / "lab"
    maker = out / "maker-lab" if args.imported else lab
    dataset = build_dataset(out, args.captions, maker)
    built = time.perf_counter()
    if args.imported:
        shutil.rmtree(maker)
        rsx(lab, "init")
        rsx(lab, "ingest", str(dataset), "--layout", "resynthesis-dataset")
    else:
        rsx(lab, "ingest", str(dataset / "manifest.csv"))
    ingested = time.perf_counter()
    common = ["eval", "--shots", args.shots, "--repeats", str(args.repeats)]
    common += ["--methods", args.methods, "--families", FAMILIES]
    if args.fusion_layers:
        common += ["--fusion-layers", args.fusion_layers]
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
