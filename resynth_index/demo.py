"""``rsx demo``: the whole method end to end on the toy zoo, in about a minute on a laptop CPU.

It builds (or reuses) a toy lab with four toy generators, makes query images with each of them
(seeds the resyntheses never use, the prompt written into the PNG the way Stable Diffusion UIs
do), asks the lab who made each one, and prints the ranking and the accuracy.
"""

from __future__ import annotations

import importlib.util
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from resynth_index.config import SETTINGS_FILE, LabSettings
from resynth_index.errors import RsxError

if TYPE_CHECKING:
    from resynth_index.pipeline.plans import ProgressCallback

DEMO_GENERATORS = {"toy-a": 11, "toy-b": 22, "toy-c": 33, "toy-d": 44}
DEMO_CAPTIONS = (
    "a head-and-shoulders portrait of an elderly fisherman, overcast light",
    "a red vintage car parked on a cobbled street at dusk",
    "a bowl of lemons on a wooden table, still life",
)
QUERY_SEED_BASE = 1000  # resyntheses use seeds 0..K-1; the 'unknown' originals use others
#: The modules ``rsx serve`` needs: what ``pip install 'resynth-index[serve]'`` brings.
SERVE_MODULES = ("starlette", "uvicorn", "python_multipart")
SERVE_INSTALL = "pip install 'resynth-index[serve]'"


def serve_extra_installed() -> bool:
    """Whether the [serve] extra is installed (``rsx serve`` refuses to start without it)."""
    return all(importlib.util.find_spec(name) is not None for name in SERVE_MODULES)


def serve_line(lab_dir: Path, installed: bool | None = None) -> str:
    """The demo's last line: how to open its lab in the web service. Without the [serve] extra
    (``installed`` False; None: look) it says what to install first, since the README's first
    command (``pip install -e .``) does not bring it."""
    command = f"rsx --lab {shlex.quote(str(lab_dir))} serve"
    if installed is None:
        installed = serve_extra_installed()
    if installed:
        return f"open it in the web service: {command}"
    return (
        f"to open it in the web service, install the [serve] extra first ({SERVE_INSTALL}),"
        f" then: {command}"
    )


def _tell(progress: ProgressCallback | None, stage: str, done: int, total: int) -> None:
    """One progress event of the demo's own steps (the status line shows it on a terminal)."""
    if progress is not None:
        from resynth_index.pipeline.plans import ProgressEvent

        progress(ProgressEvent(stage, done, total))


def open_demo_lab(lab_dir: Path, progress: ProgressCallback | None = None):
    """The toy lab, created on the first run, with every demo generator registered (a toy
    generator is built and saved in the lab first: ``progress`` hears of each)."""
    from resynth_index.lab import Lab

    if (lab_dir / SETTINGS_FILE).exists():
        if LabSettings.load(lab_dir).embedder_label != "toy":
            raise RsxError(f"{lab_dir} is a real lab, not a toy one; give the demo its own --lab")
        lab = Lab.open(lab_dir)
    else:
        _tell(progress, "creating the toy lab", 0, 1)
        lab = Lab.create(lab_dir, embedder="toy")
    present = {row.name for row in lab.generators(include_retired=True)}
    missing = [name for name in DEMO_GENERATORS if name not in present]
    for done, name in enumerate(missing):
        _tell(progress, "building the toy generators", done, len(missing))
        lab.add_toy_generator(name, DEMO_GENERATORS[name])
    return lab


def make_query_images(
    lab, folder: Path, progress: ProgressCallback | None = None
) -> dict[Path, str]:
    """One image per (toy generator, caption); returns path -> true generator."""
    from PIL.PngImagePlugin import PngInfo

    from resynth_index.models.generators.protocol import GenerationRequest

    folder.mkdir(parents=True, exist_ok=True)
    truth: dict[Path, str] = {}
    rows = {row.name: row for row in lab.generators()}
    for done, name in enumerate(DEMO_GENERATORS):
        _tell(progress, "making the query images", done, len(DEMO_GENERATORS))
        model = lab.generator_model(rows[name])
        requests = [
            GenerationRequest(caption, QUERY_SEED_BASE + i)
            for i, caption in enumerate(DEMO_CAPTIONS)
        ]
        for i, image in enumerate(model.generate(requests)):
            path = folder / f"{name}-{i}.png"
            info = PngInfo()
            info.add_text(
                "parameters",
                f"{DEMO_CAPTIONS[i]}\nSteps: {model.settings.steps}, "
                f"Seed: {QUERY_SEED_BASE + i}, Model: {name}",
            )
            image.save(path, pnginfo=info)
            truth[path] = name
    return truth


def run_demo(
    lab_dir: Path,
    out: Path | None = None,
    echo: Callable[[str], None] = print,
    progress: ProgressCallback | None = None,
) -> float:
    """Run the demo; return the accuracy over the toy query images.

    ``progress`` hears how far each long step has come (building the toy generators, making
    the query images, then the queries' own ``load``, ``generate`` and ``embed`` events), so a
    terminal can show a status line through the minute the first run takes.
    """
    from resynth_index.attribution.answer import QueryFailure
    from resynth_index.pipeline.query import run_queries
    from resynth_index.report import write_report

    lab_dir = Path(lab_dir)
    echo(f"toy lab: {lab_dir}")
    lab = open_demo_lab(lab_dir, progress)
    out = Path(out) if out else lab_dir / "demo"
    truth = make_query_images(lab, out / "queries", progress)
    echo(f"{len(truth)} query images of known source in {out / 'queries'}")
    results = run_queries(lab, list(truth), progress=progress)
    answered = [r for r in results if not isinstance(r, QueryFailure)]
    for failure in (r for r in results if isinstance(r, QueryFailure)):
        echo(f"failed: {failure.image}: {failure.error}")
    echo("")
    echo(f"{'image':<12} {'true':<7} {'verdict':<8} {'distance':>8} {'margin':>7}  ranking")
    correct = 0
    for result in answered:
        true = truth[Path(result.image)]
        correct += result.verdict == true
        ranking = " ".join(f"{e.generator}:{e.distance:.3f}" for e in result.ranking)
        margin = f"{result.margin:.3f}" if result.margin is not None else "-"
        echo(
            f"{Path(result.image).stem:<12} {true:<7} {result.verdict:<8} "
            f"{result.ranking[0].distance:>8.4f} {margin:>7}  {ranking}"
        )
    accuracy = correct / len(truth) if truth else 0.0
    generated = sum(r.generated for r in answered)
    reused = sum(r.reused for r in answered)
    echo("")
    echo(
        f"accuracy: {correct}/{len(truth)} = {accuracy:.1%} "
        f"(resyntheses generated {generated}, reused {reused}; caption source: "
        f"{answered[0].caption_source if answered else '-'})"
    )
    report = out / "report.html"
    write_report(lab, answered, report)
    echo(f"report: {report}")
    lab.close()
    return accuracy
