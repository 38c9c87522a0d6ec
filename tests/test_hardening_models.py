"""Issue 10 (items 3, 4, 6, 9, 10): cache keys that cover the resolved dtype, an embedder
precision fixed at init, generators validated before they are registered, work-order CSVs that
cannot run formulas, and folder walks that survive link cycles."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.cli import cli
from resynth_index.config import SETTINGS_FILE, LabSettings
from resynth_index.errors import ModelLoadError, StoreError
from resynth_index.lab import Lab
from resynth_index.media.captions import caption_hash
from resynth_index.media.folders import walk_files
from resynth_index.models.generators.diffusers import check_pipeline_folder, weights_fingerprint
from resynth_index.models.generators.protocol import GenerationSettings
from resynth_index.pipeline.work_orders import neutralise_cell, restore_cell

CAPTION = "a red kite over a grey sea"


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def generator_names(lab: Path) -> list[str]:
    listed = rsx(lab, "generator", "list", "--all", "--json")
    assert listed.exit_code == 0, listed.output
    return [json.loads(line)["name"] for line in listed.stdout.splitlines()]


# --------------------------------------------------------------------- 10.3 resolved dtype keys
def test_cache_key_resolves_dtype_for_the_device():
    auto = GenerationSettings()
    assert auto.cache_hash("cpu") != auto.cache_hash("cuda")
    assert auto.cache_hash("cuda") == auto.cache_hash("cuda:1")
    assert auto.cache_hash("cpu") == GenerationSettings(dtype="float32").cache_hash("cpu")
    assert auto.cache_hash("cpu") == auto.cache_hash("mps")
    assert auto.cache_hash("cuda") == GenerationSettings(dtype="float16").cache_hash("cpu")
    # an explicit dtype is the same on every device
    bf16 = GenerationSettings(dtype="bfloat16")
    assert bf16.cache_hash("cpu") == bf16.cache_hash("cuda")
    assert GenerationSettings(dtype="float32").cache_hash("cuda") == auto.cache_hash("cpu")
    # every other output-affecting field still counts; the device field itself does not
    assert GenerationSettings(steps=24).cache_hash("cpu") != auto.cache_hash("cpu")
    assert GenerationSettings(device="cpu").cache_hash("cpu") == auto.cache_hash("cpu")
    assert auto.resolved("cuda").dtype == "float16" and auto.resolved("cpu").dtype == "float32"


def test_keys_stored_by_a_cpu_lab_before_the_fix_stay_valid():
    """Old keys hashed dtype "auto" literally: on a CPU that was float32, and still is."""
    for settings in (GenerationSettings(), GenerationSettings(steps=4, guidance=3.0, width=64)):
        assert settings.cache_hash("cpu") == settings.output_hash()
    fp16 = GenerationSettings(dtype="float16")
    assert fp16.cache_hash("cuda") == fp16.output_hash()


def test_resyntheses_made_on_a_cpu_are_not_reused_on_cuda(toy_lab):
    from resynth_index.models.generators.factory import settings_hash
    from resynth_index.pipeline.plans import captions_by_hash, plan_resyntheses
    from resynth_index.pipeline.resynthesis import resynthesize

    captions = captions_by_hash([CAPTION])
    with Lab.open(toy_lab, device="cpu") as lab:
        rows = [row for row in lab.generators() if row.name == "toy-a"]
        assert resynthesize(lab, captions, rows).generated == 1
        assert plan_resyntheses(lab, list(captions), rows).missing_count() == 0
    row = rows[0]
    cpu_key = settings_hash(row.kind, row.settings_json, "cpu")
    registered = GenerationSettings.from_dict(json.loads(row.settings_json)["generation"])
    assert cpu_key == registered.output_hash()  # a CPU lab's stored keys are unchanged
    assert settings_hash(row.kind, row.settings_json, "cuda") != cpu_key
    with Lab.open(toy_lab, device="cuda") as lab:  # only planned, never run: no GPU needed
        on_cuda = plan_resyntheses(lab, list(captions), rows)
        assert on_cuda.missing_count() == 1  # float16 pictures would differ: not reused
        assert not any(on_cuda.stored.values())


# --------------------------------------------------------------------- 10.4 embedder precision
def test_init_records_the_resolved_precision(tmp_path):
    with Lab.create(tmp_path / "lab", embedder="toy", device="cpu") as lab:
        assert lab.settings.embedder_precision == "fp32"
    assert LabSettings.load(tmp_path / "lab").embedder_precision == "fp32"
    made = rsx(tmp_path / "half", "--device", "cpu", "init", "--precision", "fp16")
    assert made.exit_code == 0, made.output
    assert LabSettings.load(tmp_path / "half").embedder_precision == "fp16"


def test_a_lab_made_in_fp16_opens_on_a_cpu(tmp_path):
    """What a GPU writes under "auto" (fp16) must open on a CPU with the same fingerprint."""
    root = tmp_path / "lab"
    with Lab.create(root, embedder="toy", device="cpu", precision="fp16") as lab:
        made_with = lab.settings.embedder_fingerprint
    assert LabSettings.load(root).embedder_precision == "fp16"
    with Lab.open(root, device="cpu") as lab:
        assert lab.embedder.fingerprint == made_with
        assert lab.embedder.precision == "fp16"
    with Lab.open(root) as lab:  # "auto" on this CPU machine
        assert lab.embedder.fingerprint == made_with


def _legacy_settings(root: Path, precision: str) -> str:
    """Rewrite settings.json as an older rsx wrote it on a machine whose "auto" was
    ``precision`` (no embedder_precision field). Returns that fingerprint."""
    from resynth_index.models.embedders import EmbedderSpec, load_embedder

    raw = json.loads((root / SETTINGS_FILE).read_text())
    spec = EmbedderSpec.from_dict(raw["embedder"])
    folder = Path(spec.weights.removeprefix("local-dir:"))
    absolute = EmbedderSpec(spec.arch, f"local-dir:{root / folder}", spec.layer)
    fingerprint = load_embedder(absolute, device="cpu", precision=precision).fingerprint
    raw.pop("embedder_precision")
    raw["embedder_fingerprint"] = fingerprint
    (root / SETTINGS_FILE).write_text(json.dumps(raw))
    return fingerprint


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_older_settings_without_a_precision_still_open(tmp_path, precision):
    root = tmp_path / "lab"
    Lab.create(root, embedder="toy", device="cpu").close()
    fingerprint = _legacy_settings(root, precision)
    assert LabSettings.load(root).embedder_precision == ""
    with Lab.open(root, device="cpu") as lab:
        assert lab.embedder.fingerprint == fingerprint
        assert lab.embedder.precision == precision


def test_a_bad_recorded_precision_is_one_line(tmp_path):
    root = tmp_path / "lab"
    Lab.create(root, embedder="toy", device="cpu").close()
    raw = json.loads((root / SETTINGS_FILE).read_text())
    raw["embedder_precision"] = "fp8"
    (root / SETTINGS_FILE).write_text(json.dumps(raw))
    with pytest.raises(StoreError, match="embedder_precision"):
        Lab.open(root)


# --------------------------------------------------------------------- 10.6 validated generators
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    from resynth_index.models.toyzoo.pipelines import build_toy_pipeline

    folder = tmp_path_factory.mktemp("pipe") / "toy77"
    build_toy_pipeline(77).save_pretrained(folder)
    return folder


def _broken_copy(pipeline_dir: Path, target: Path, how: str) -> Path:
    shutil.copytree(pipeline_dir, target)
    index_path = target / "model_index.json"
    index = json.loads(index_path.read_text())
    if how == "empty index":
        index_path.write_text("{}")
    elif how == "index not json":
        index_path.write_text("{not json")
    elif how == "unknown class":
        index["_class_name"] = "NoSuchPipeline"
        index_path.write_text(json.dumps(index))
    elif how == "not text-to-image":
        index["_class_name"] = "DDPMPipeline"
        index_path.write_text(json.dumps(index))
    elif how == "component not listed":
        del index["vae"]
        index_path.write_text(json.dumps(index))
    elif how == "component folder missing":
        shutil.rmtree(target / "unet")
    elif how == "component config broken":
        (target / "unet" / "config.json").write_text('{"in_channels": 4,')
    elif how == "scheduler config missing":
        (target / "scheduler" / "scheduler_config.json").unlink()
    elif how == "weights missing":
        for weights in (target / "vae").glob("*.safetensors"):
            weights.unlink()
    else:
        raise AssertionError(how)
    return target


BROKEN = {
    "empty index": "_class_name",
    "index not json": "model_index.json",
    "unknown class": "NoSuchPipeline",
    "not text-to-image": "text-to-image",
    "component not listed": "vae",
    "component folder missing": "unet",
    "component config broken": "config.json",
    "scheduler config missing": "scheduler",
    "weights missing": "weights",
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_a_broken_pipeline_folder_is_refused_and_not_registered(
    toy_lab, pipeline_dir, tmp_path, how
):
    folder = _broken_copy(pipeline_dir, tmp_path / "broken", how)
    before = generator_names(toy_lab)
    result = rsx(toy_lab, "generator", "add", "x", "--diffusers", str(folder))
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert BROKEN[how] in result.output
    assert generator_names(toy_lab) == before


def test_a_sound_folder_passes_and_the_safety_checker_may_be_absent(pipeline_dir, tmp_path):
    assert check_pipeline_folder(pipeline_dir) == "StableDiffusionPipeline"
    folder = shutil.copytree(pipeline_dir, tmp_path / "with-checker")
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert check_pipeline_folder(folder) == "StableDiffusionPipeline"  # never loaded by rsx


@pytest.mark.slow
def test_check_load_catches_what_the_files_alone_do_not(toy_lab, pipeline_dir, tmp_path):
    folder = shutil.copytree(pipeline_dir, tmp_path / "bad-weights")
    [weights] = (folder / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:4096])  # a truncated download
    refused = rsx(toy_lab, "generator", "add", "x", "--diffusers", str(folder), "--check-load")
    assert refused.exit_code == 1, refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert "x" not in generator_names(toy_lab)
    good = rsx(
        toy_lab, "generator", "add", "good", "--diffusers", str(pipeline_dir), "--check-load"
    )
    assert good.exit_code == 0, good.output
    assert "good" in generator_names(toy_lab)


def test_a_single_file_that_is_not_safetensors_is_refused(toy_lab, pipeline_dir, tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    result = rsx(
        toy_lab, "generator", "add", "x", "--diffusers", str(fake), "--config", str(pipeline_dir)
    )
    assert result.exit_code == 1 and "safetensors" in result.output
    assert "x" not in generator_names(toy_lab)


def test_toy_with_tuning_is_refused_before_anything_is_written(toy_lab):
    result = rsx(toy_lab, "generator", "add", "t", "--toy", "5", "--steps", "9")
    assert result.exit_code == 2 and "toy settings" in result.output
    assert "t" not in generator_names(toy_lab)
    assert not (toy_lab / "models" / "toy-t").exists()
    stray = rsx(toy_lab, "generator", "add", "u", "--imported", "--config", str(toy_lab))
    assert stray.exit_code == 2 and "--config" in stray.output
    load = rsx(toy_lab, "generator", "add", "u", "--imported", "--check-load")
    assert load.exit_code == 2 and "--check-load" in load.output
    assert "u" not in generator_names(toy_lab)


# --------------------------------------------------------------------- 10.9 formula injection
@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_formula_cells_are_neutralised_and_restored(start):
    text = f"{start}cmd|' /C calc'!A0"
    assert neutralise_cell(text) == "'" + text
    assert restore_cell(neutralise_cell(text)) == text
    quoted = "'" + text  # a caption that itself starts with the quote survives too
    assert restore_cell(neutralise_cell(quoted)) == quoted


def test_plain_cells_are_left_alone():
    for text in ["a lighthouse", "'quoted", "", "a=b", "'", "x-ray"]:
        assert neutralise_cell(text) == text
        assert restore_cell(text) == text


@pytest.mark.slow  # query, export-prompts, ingest, query: end to end
def test_exported_formula_caption_round_trips_through_ingest(toy_lab, make_toy_image, tmp_path):
    from sqlalchemy import select

    from resynth_index.store.models import ResynthesisRow

    formula = '=HYPERLINK("http://x.example/","click")'
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    image = make_toy_image("toy-a", formula)
    asked = rsx(toy_lab, "query", str(image), "--caption", formula, "--json")
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.stdout)["pending"] == ["mj"]

    orders = tmp_path / "orders.csv"
    assert rsx(toy_lab, "export-prompts", "--out", str(orders)).exit_code == 0
    rows = list(csv.DictReader(orders.open(newline="", encoding="utf-8")))
    assert [r["caption"] for r in rows] == ["'" + formula]
    assert all(not cell.startswith(("=", "+", "-", "@")) for r in rows for cell in r.values())

    delivered = make_toy_image("toy-b", formula, seed=4242, name="mj-made.png")
    rows[0]["path"] = delivered.name
    manifest = tmp_path / "delivered.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ingested = rsx(toy_lab, "ingest", str(manifest))
    assert ingested.exit_code == 0, ingested.output
    with Lab.open(toy_lab) as lab, lab.session() as session:
        mj = next(row for row in lab.generators() if row.name == "mj")
        hashes = session.scalars(
            select(ResynthesisRow.caption_hash).where(ResynthesisRow.generator_id == mj.id)
        ).all()
    assert hashes == [caption_hash(formula)]
    assert rsx(toy_lab, "export-prompts").stdout.strip().splitlines() == [
        "generator,caption_hash,caption,role,path"
    ]


def test_captions_file_from_a_work_order_is_restored(tmp_path):
    from resynth_index.pipeline.plans import read_captions_file

    path = tmp_path / "orders.csv"
    path.write_text("generator,caption\nmj,'=1+1\nmj,'-minus\n", encoding="utf-8")
    assert read_captions_file(path) == ["=1+1", "-minus"]


# --------------------------------------------------------------------- 10.10 link cycles
def _link(target: str, at: Path) -> None:
    try:
        os.symlink(target, at, target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("this file system cannot make symbolic links")


def test_walk_enters_each_real_directory_once(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "deep" / "x.png").write_bytes(b"x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y.png").write_bytes(b"y")
    _link("..", tmp_path / "a" / "deep" / "up")  # a cycle
    _link("../b", tmp_path / "a" / "to-b")  # b reached twice
    _link("missing", tmp_path / "dangling")
    found = [p.relative_to(tmp_path).as_posix() for p in walk_files(tmp_path)]
    assert found == ["a/deep/x.png", "a/to-b/y.png", "dangling"]


def test_diffusers_fingerprint_survives_a_link_to_the_parent(pipeline_dir, tmp_path):
    folder = shutil.copytree(pipeline_dir, tmp_path / "pipe")
    plain = weights_fingerprint(folder)
    _link("..", folder / "unet" / "parent")
    assert weights_fingerprint(folder) == plain


def test_diffusers_fingerprint_follows_a_linked_component(pipeline_dir, tmp_path):
    """A pipeline folder assembled from links hashes like its copy (links are followed)."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for entry in sorted(pipeline_dir.iterdir()):
        if entry.is_dir():
            _link(str(entry), linked / entry.name)
        else:
            shutil.copy(entry, linked / entry.name)
    assert weights_fingerprint(linked) == weights_fingerprint(pipeline_dir)


def test_a_dangling_weight_link_is_one_line(pipeline_dir, tmp_path):
    folder = shutil.copytree(pipeline_dir, tmp_path / "pipe")
    os.symlink(tmp_path / "gone.safetensors", folder / "vae" / "extra.safetensors")
    with pytest.raises(ModelLoadError, match="extra.safetensors"):
        weights_fingerprint(folder)


@pytest.mark.slow
def test_ingest_a_folder_with_a_link_cycle(toy_lab, make_toy_image, tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shutil.move(make_toy_image("toy-a", CAPTION), images / "sub" / "a.png")
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.move(make_toy_image("toy-b", CAPTION), other / "b.png")
    _link("..", images / "sub" / "loop")
    _link(str(other), images / "linked")
    _link(str(other), images / "linked-again")
    result = rsx(toy_lab, "ingest", str(images))
    assert result.exit_code == 0, result.output
    assert "2 added" in result.output and "0 failed" in result.output
