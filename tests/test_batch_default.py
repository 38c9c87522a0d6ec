"""The generation batch size "auto": chosen for the device, per generator; a number still wins.

The choice is a pure function of (device type, image size, pipeline class, free memory), tested
here on injected devices and memory (no GPU is needed); the lab setting round-trips as "auto",
old labs holding the old default 8 follow the new default, and `rsx resynthesize` on the toy zoo
(a CPU) generates in batches of the CPU value, as the batch passed to the pipeline shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from resynth_index.cli import cli
from resynth_index.config import SETTINGS_FILE, LabSettings
from resynth_index.errors import StoreError
from resynth_index.models.generators import batching
from resynth_index.models.generators.batching import (
    CPU_BATCH,
    MEMORY_FRACTION,
    activation_bytes_per_image,
    default_batch_size,
)
from resynth_index.models.generators.protocol import GenerationSettings

GIB = 1024**3
PLENTY = 70 * GIB  # an H100 with an SD1.5 or SDXL pipeline loaded
CAPTIONS = ["a red bicycle", "two cats on a sofa", "a lighthouse", "a bowl of lemons", "a kite"]


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


# ------------------------------------------------------------------ the pure function
@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_a_cpu_gets_the_cpu_batch_whatever_the_size_or_memory(device: str) -> None:
    assert CPU_BATCH == 4
    assert default_batch_size(device, 512, 512) == CPU_BATCH
    assert default_batch_size(device, 1024, 1024, free_bytes=PLENTY) == CPU_BATCH
    assert default_batch_size(device, 64, 64, free_bytes=0) == CPU_BATCH


def test_cuda_sd15_at_512_with_plenty_of_memory_gets_16() -> None:
    pipe = "StableDiffusionPipeline"
    assert default_batch_size("cuda", 512, 512, free_bytes=PLENTY, pipeline_class=pipe) == 16
    assert default_batch_size("cuda:1", 512, 512, free_bytes=PLENTY) == 16
    assert default_batch_size("cuda", 512, 512) == 16  # free memory unknown: no cap


def test_cuda_sdxl_at_1024_gets_4_and_other_sizes_scale_by_pixels() -> None:
    pipe = "StableDiffusionXLPipeline"
    assert default_batch_size("cuda", 1024, 1024, free_bytes=PLENTY, pipeline_class=pipe) == 4
    assert default_batch_size("cuda", 768, 768, free_bytes=PLENTY) == 7  # 16 * 512² / 768²
    assert default_batch_size("cuda", 512, 1024, free_bytes=PLENTY) == 8
    assert default_batch_size("cuda", 64, 64, free_bytes=PLENTY) == batching.MAX_CUDA_BATCH


def test_little_free_memory_shrinks_the_batch_and_never_below_one() -> None:
    per_image = activation_bytes_per_image(512, 512)
    fits_five = int(5.5 * per_image / MEMORY_FRACTION)
    assert default_batch_size("cuda", 512, 512, free_bytes=fits_five) == 5
    shrinking = [default_batch_size("cuda", 512, 512, free_bytes=g * GIB) for g in (16, 8, 4, 2)]
    assert shrinking == sorted(shrinking, reverse=True) and shrinking[0] > shrinking[-1]
    assert all(1 <= batch <= 16 for batch in shrinking)
    assert default_batch_size("cuda", 512, 512, free_bytes=0) == 1
    assert default_batch_size("cuda", 4096, 4096, free_bytes=GIB) == 1
    # float32 activations are twice float16's: the cap halves
    half = default_batch_size("cuda", 512, 512, free_bytes=fits_five, dtype="float32")
    assert half == 2


def test_the_sdxl_estimate_is_the_larger_per_pixel() -> None:
    sd = activation_bytes_per_image(1024, 1024, "StableDiffusionPipeline")
    xl = activation_bytes_per_image(1024, 1024, "StableDiffusionXLPipeline")
    assert xl > sd
    budget = int(3.5 * xl / MEMORY_FRACTION)  # three and a half SDXL images
    xl_batch = default_batch_size(
        "cuda", 1024, 1024, free_bytes=budget, pipeline_class="StableDiffusionXLPipeline"
    )
    assert xl_batch == 3
    assert default_batch_size("cuda", 1024, 1024, free_bytes=budget) == 4  # SD-class: not capped


def test_a_generator_on_cuda_is_loaded_then_sized_by_the_free_memory(monkeypatch) -> None:
    """``generator_batch_size`` reads free memory after loading (weights first), on the device
    the generator's settings resolve to: CUDA and its memory are injected here."""
    import torch

    class StableDiffusionXLPipeline:  # what load() returns; only its class name is read
        pass

    calls: list[str] = []

    def load():
        calls.append("load")
        return StableDiffusionXLPipeline()

    def mem_get_info(device):
        calls.append(f"mem {device}")
        return (PLENTY, 80 * GIB)

    monkeypatch.setattr("resynth_index.models.devices.resolve_device", lambda choice: "cuda:0")
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    model = SimpleNamespace(settings=GenerationSettings(width=1024, height=1024), load=load)
    assert batching.generator_batch_size(model) == 4
    assert calls == ["load", "mem cuda:0"]
    assert batching.resolve_batch_size("auto", model) == 4
    assert batching.resolve_batch_size(None, model) == 4
    calls.clear()
    assert batching.resolve_batch_size(12, model) == 12  # an explicit number wins, unsized
    assert calls == []


def test_a_generator_on_a_cpu_is_sized_without_loading(monkeypatch) -> None:
    monkeypatch.setattr("resynth_index.models.devices.resolve_device", lambda choice: "cpu")

    def load():
        raise AssertionError("a CPU batch needs no loaded pipeline")

    model = SimpleNamespace(settings=GenerationSettings(), load=load)
    assert batching.generator_batch_size(model) == CPU_BATCH


# ------------------------------------------------------------------ the setting
def test_a_new_lab_says_auto_and_the_setting_round_trips(toy_lab: Path) -> None:
    raw = json.loads((toy_lab / SETTINGS_FILE).read_text(encoding="utf-8"))
    assert raw["generation_batch_size"] == "auto"
    assert LabSettings.load(toy_lab).generation_batch_size == "auto"
    assert rsx(toy_lab, "config", "get", "generation_batch_size").output == "auto\n"
    assert json.loads(rsx(toy_lab, "config", "get", "--json").output)["generation_batch_size"] == (
        "auto"
    )

    done = rsx(toy_lab, "config", "set", "generation_batch_size", "6")
    assert done.exit_code == 0 and done.output == "generation_batch_size: auto -> 6\n"
    assert LabSettings.load(toy_lab).generation_batch_size == 6
    back = rsx(toy_lab, "config", "set", "generation_batch_size", "AUTO")
    assert back.exit_code == 0 and back.output == "generation_batch_size: 6 -> auto\n"
    assert LabSettings.load(toy_lab).generation_batch_size == "auto"
    refused = rsx(toy_lab, "config", "set", "generation_batch_size", "many")
    assert refused.exit_code == 1
    assert "generation_batch_size must be a whole number at least 1, or auto" in refused.output


def _rewrite(lab: Path, **values) -> None:
    path = lab / SETTINGS_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw.update(values)
    path.write_text(json.dumps(raw), encoding="utf-8")


def test_an_old_lab_with_the_old_default_follows_the_new_one(toy_lab: Path) -> None:
    """Version-1 labs were all written with 8: unless 8 was chosen (a recorded change), they
    now follow the device; a chosen 8, or an 8 in a current file, stays 8."""
    _rewrite(toy_lab, version=1, generation_batch_size=8, changes=[])
    assert LabSettings.load(toy_lab).generation_batch_size == "auto"
    assert rsx(toy_lab, "config", "get", "generation_batch_size").output == "auto\n"

    chosen = {"at": "2025-01-01T00:00:00+00:00", "key": "generation_batch_size", "old": 4, "new": 8}
    _rewrite(toy_lab, version=1, generation_batch_size=8, changes=[chosen])
    assert LabSettings.load(toy_lab).generation_batch_size == 8

    _rewrite(toy_lab, version=1, generation_batch_size=12, changes=[])
    assert LabSettings.load(toy_lab).generation_batch_size == 12  # not the old default: chosen

    _rewrite(toy_lab, version=2, generation_batch_size=8, changes=[])
    assert LabSettings.load(toy_lab).generation_batch_size == 8

    _rewrite(toy_lab, generation_batch_size=None)
    assert LabSettings.load(toy_lab).generation_batch_size == "auto"

    _rewrite(toy_lab, generation_batch_size="big")
    with pytest.raises(StoreError, match="or auto"):
        LabSettings.load(toy_lab)


# ------------------------------------------------------------------ end to end (toy zoo, a CPU)
@pytest.fixture
def batches_passed(monkeypatch) -> list[int]:
    """Every batch_size the toy pipelines are asked to generate with, in order."""
    from resynth_index.models.generators import diffusers

    seen: list[int] = []
    real = diffusers.generate_images

    def spy(pipe, requests, settings, batch_size=8, progress=None):
        seen.append(batch_size)
        return real(pipe, requests, settings, batch_size, progress)

    monkeypatch.setattr(diffusers, "generate_images", spy)
    return seen


def _captions(tmp_path: Path) -> Path:
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS), encoding="utf-8")
    return path


def test_resynthesize_uses_the_cpu_default_and_says_so(toy_lab, tmp_path, batches_passed) -> None:
    captions = _captions(tmp_path)
    result = rsx(
        toy_lab, "resynthesize", "--captions", str(captions), "--generator", "toy-a", "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["generated"] == 5 and summary["batch_setting"] == "auto"
    assert summary["batch_sizes"] == {"toy-a": CPU_BATCH}
    assert batches_passed == [CPU_BATCH, CPU_BATCH]  # 5 images: a batch of 4, then one of 1

    more = _captions(tmp_path)
    more.write_text("a windmill\na harbour at night", encoding="utf-8")
    line = rsx(toy_lab, "resynthesize", "--captions", str(more), "--generator", "toy-b")
    assert line.exit_code == 0, line.output
    assert line.output.strip().endswith(f"2 generated, 0 already stored; batch {CPU_BATCH} (auto)")


def test_an_explicit_batch_wins_over_auto(toy_lab, tmp_path, batches_passed) -> None:
    captions = _captions(tmp_path)
    assert rsx(toy_lab, "config", "set", "generation_batch_size", "3").exit_code == 0
    result = rsx(
        toy_lab, "resynthesize", "--captions", str(captions), "--generator", "toy-a", "--json"
    )
    summary = json.loads(result.output)
    assert summary["batch_setting"] == 3 and summary["batch_sizes"] == {"toy-a": 3}
    assert batches_passed == [3, 3]

    batches_passed.clear()
    flag = rsx(
        toy_lab,
        "resynthesize",
        "--captions",
        str(captions),
        "--generator",
        "toy-b",
        "--batch-size",
        "2",
    )
    assert flag.output.strip().endswith("5 generated, 0 already stored; batch 2")
    assert batches_passed == [2, 2, 2]


def test_nothing_generated_shows_no_batch(toy_lab, tmp_path) -> None:
    captions = _captions(tmp_path)
    assert rsx(toy_lab, "resynthesize", "--captions", str(captions), "--generator", "toy-a")
    again = rsx(toy_lab, "resynthesize", "--captions", str(captions), "--generator", "toy-a")
    assert again.output.strip().endswith("0 generated, 5 already stored")
    as_json = rsx(
        toy_lab, "resynthesize", "--captions", str(captions), "--generator", "toy-a", "--json"
    )
    assert json.loads(as_json.output)["batch_sizes"] == {}


# ------------------------------------------------------------------ Ray sizes as the local path
@pytest.mark.slow
def test_ray_resolves_auto_on_its_actors_as_the_local_path_does(toy_lab) -> None:
    ray = pytest.importorskip("ray")
    from resynth_index.distributed.executor import RayResynthesizer
    from resynth_index.distributed.session import RayOptions
    from resynth_index.lab import Lab
    from resynth_index.pipeline import plans

    texts = plans.captions_by_hash(CAPTIONS)
    started = not ray.is_initialized()
    if started:
        # a Ray of its own (address "local"), whatever cluster this machine may already run
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with Lab.open(toy_lab) as lab, RayResynthesizer(lab, RayOptions(actors=1)) as runner:
            rows = [row for row in plans.runnable_generators(lab) if row.name == "toy-a"]
            summary = runner.resynthesize(texts, rows)
    finally:
        if started:
            ray.shutdown()
    assert summary.generated == 5
    assert summary.batch_sizes == {"toy-a": CPU_BATCH}
