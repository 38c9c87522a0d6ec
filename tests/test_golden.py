"""Answers do not change when the code is reorganised: a few queries of a toy lab, their JSON
compared with answers recorded before (tests/golden/answers.json).

The lab: the toy zoo's three generators and an imported one; references of each toy generator,
a prediction-set calibration and a fused one on them. The queries: a plain resynthesis answer,
one with the calibration's prediction set, a fused answer, and one with the imported candidate
pending under --no-generate. Paths are reduced to file names; numbers compare to 1e-6 (the
toy models run in float32 on the CPU). ``RSX_GOLDEN=write`` records the answers anew: only when
a change of the answers is meant, and said so in its commit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.cli import cli

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "answers.json"
CAPTIONS = ("a red barn in a field", "a lighthouse at dusk", "a bowl of lemons")
QUERIES = {
    "resynthesis": ["--caption", CAPTIONS[0]],
    "calibrated": ["--caption", CAPTIONS[1], "--candidates", "toy-a,toy-b,toy-c"],
    "fused": ["--caption", CAPTIONS[2], "--method", "fused", "--candidates", "toy-a,toy-b,toy-c"],
    "pending": ["--caption", CAPTIONS[0], "--candidates", "toy-a,mj", "--no-generate"],
}


def rsx(lab: Path, *args: str):
    result = CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    return result


@pytest.fixture(scope="module")
def golden_lab(toy_lab_template: Path, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    from conftest import TOY_GENERATORS

    from resynth_index.lab import Lab
    from resynth_index.models.generators.protocol import GenerationRequest

    root = tmp_path_factory.mktemp("golden")
    lab = shutil.copytree(toy_lab_template, root / "lab")
    refs = root / "refs"
    refs.mkdir()
    with Lab.open(lab) as opened:
        rows = {row.name: row for row in opened.generators()}
        for name in TOY_GENERATORS:
            model = opened.generator_model(rows[name])
            for n, caption in enumerate(CAPTIONS):
                image = model.generate([GenerationRequest(caption, 2000 + n)])[0]
                image.save(refs / f"{name}-{n}.png")
                (refs / f"{name}-{n}.txt").write_text(caption, encoding="utf-8")
        queries = {}
        for key, generator in zip(QUERIES, ("toy-a", "toy-b", "toy-c", "toy-a"), strict=True):
            model = opened.generator_model(rows[generator])
            caption = QUERIES[key][1]
            queries[key] = root / f"{key}.png"
            model.generate([GenerationRequest(caption, 3000)])[0].save(queries[key])
    assert rsx(lab, "generator", "add", "mj", "--imported").exit_code == 0
    for name in TOY_GENERATORS:
        files = [str(p) for p in sorted(refs.glob(f"{name}-*.png"))]
        stored = rsx(lab, "ingest", *files, "--role", "reference", "--generator", name)
        assert stored.exit_code == 0, stored.output
    candidates = ["--candidates", "toy-a,toy-b,toy-c"]
    assert rsx(lab, "calibrate", "--coverage", "0.8", *candidates).exit_code == 0
    fused = rsx(lab, "calibrate", "--method", "fused", "--fusion-layers", "1", *candidates)
    assert fused.exit_code == 0, fused.output
    return lab, queries


def _answers(lab: Path, images: dict[str, Path]) -> dict[str, dict]:
    found = {}
    for key, args in QUERIES.items():
        result = rsx(lab, "query", str(images[key]), "--json", *args)
        [line] = [line for line in result.stdout.splitlines() if line.startswith("{")]
        found[key] = _portable(json.loads(line))
    return found


def _portable(value):
    """The answer with paths reduced to their file names (the test's folders differ per run)
    and times left out (``created_at`` and the like: when, not what)."""
    if isinstance(value, dict):
        return {
            key: "<time>" if key.endswith("_at") else _portable(item) for key, item in value.items()
        }
    if isinstance(value, list):
        return [_portable(item) for item in value]
    if isinstance(value, str) and os.sep in value and Path(value).is_absolute():
        return Path(value).name
    return value


def _same(recorded, now, where: str = "answer") -> list[str]:
    """Where ``now`` differs from ``recorded`` (numbers to 1e-6)."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        differences = []
        for key in sorted(set(recorded) | set(now)):
            if key not in now or key not in recorded:
                differences.append(f"{where}.{key}: only in {'now' if key in now else 'recorded'}")
            else:
                differences += _same(recorded[key], now[key], f"{where}.{key}")
        return differences
    if isinstance(recorded, list) and isinstance(now, list):
        if len(recorded) != len(now):
            return [f"{where}: {len(recorded)} items recorded, {len(now)} now"]
        return [
            d
            for n, (a, b) in enumerate(zip(recorded, now, strict=True))
            for d in _same(a, b, f"{where}[{n}]")
        ]
    numbers = (int, float)
    if isinstance(recorded, numbers) and isinstance(now, numbers) and not isinstance(now, bool):
        return (
            []
            if math.isclose(recorded, now, rel_tol=1e-6, abs_tol=1e-6)
            else [f"{where}: {recorded} recorded, {now} now"]
        )
    return [] if recorded == now else [f"{where}: {recorded!r} recorded, {now!r} now"]


def test_answers_are_those_recorded(golden_lab):
    lab, images = golden_lab
    now = _answers(lab, images)
    if os.environ.get("RSX_GOLDEN") == "write":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    recorded = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert set(recorded) == set(QUERIES)
    assert now["calibrated"].get("prediction_set"), "the calibrated answer must use its set"
    assert now["fused"].get("fusion", {}).get("source") == "recorded"
    assert now["pending"]["pending"] == ["mj"]
    differences = [d for key in QUERIES for d in _same(recorded[key], now[key], key)]
    assert not differences, "\n".join(differences[:40])
