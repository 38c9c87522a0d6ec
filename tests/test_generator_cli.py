"""`rsx generator add/list/remove` with real diffusers folders, including ones rsx did not write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.cli import cli

pytestmark = pytest.mark.slow  # end to end through the CLI: not in the quick loop


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def test_a_pipeline_saved_by_a_plain_diffusers_script_is_a_candidate(toy_lab, tmp_path):
    from resynth_index.models.toyzoo.pipelines import build_toy_pipeline

    folder = tmp_path / "plain-sd"
    build_toy_pipeline(77).save_pretrained(folder)  # what a lab's own download script would do
    added = rsx(
        toy_lab,
        "generator",
        "add",
        "plain",
        "--diffusers",
        str(folder),
        "--steps",
        "4",
        "--guidance",
        "3",
        "--size",
        "64x64",
        "--scheduler",
        "DDIMScheduler",
    )
    assert added.exit_code == 0, added.output
    listed = [
        json.loads(line) for line in rsx(toy_lab, "generator", "list", "--json").stdout.splitlines()
    ]
    plain = next(g for g in listed if g["name"] == "plain")
    assert plain["kind"] == "diffusers"
    assert plain["settings"]["generation"]["steps"] == 4

    # an image made by that same pipeline is attributed to it
    from resynth_index.models.generators.diffusers import DiffusersGenerator
    from resynth_index.models.generators.protocol import GenerationRequest, GenerationSettings

    settings = GenerationSettings(
        steps=4, guidance=3.0, width=64, height=64, scheduler="DDIMScheduler"
    )
    image = DiffusersGenerator("x", folder, settings).generate(
        [GenerationRequest("a barn in snow", 999)]
    )[0]
    path = tmp_path / "q.png"
    image.save(path)
    result = rsx(toy_lab, "query", str(path), "--caption", "a barn in snow", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["verdict"] == "plain"
    assert answer["generated"] == 4


def test_generator_add_errors_are_one_line(toy_lab, tmp_path):
    missing = rsx(toy_lab, "generator", "add", "x", "--diffusers", str(tmp_path / "nope"))
    assert missing.exit_code == 1 and "nope" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    bad = rsx(toy_lab, "generator", "add", "x", "--diffusers", str(not_a_pipeline))
    assert bad.exit_code == 1 and "model_index.json" in bad.output
    both = rsx(toy_lab, "generator", "add", "x", "--imported", "--toy", "3")
    assert both.exit_code == 2 and "exactly one" in both.output
    duplicate = rsx(toy_lab, "generator", "add", "toy-a", "--imported")
    assert duplicate.exit_code == 1 and "already registered" in duplicate.output
    bad_name = rsx(toy_lab, "generator", "add", "a,b", "--imported")
    assert bad_name.exit_code == 1 and "invalid generator name" in bad_name.output
    bad_size = rsx(
        toy_lab, "generator", "add", "y", "--diffusers", str(tmp_path), "--size", "65x64"
    )
    assert bad_size.exit_code == 2 and "multiples of 8" in bad_size.output
    assert "x" not in rsx(toy_lab, "generator", "list").stdout.split()


def test_init_refuses_an_existing_lab_and_a_bad_embedder(toy_lab, tmp_path):
    again = rsx(toy_lab, "init")
    assert again.exit_code == 1 and "already an rsx lab" in again.output
    bad = rsx(tmp_path / "new", "init", "--embedder", "nonsense")
    assert bad.exit_code == 1 and "ARCH@WEIGHTS" in bad.output
    missing = rsx(tmp_path / "new2", "init", "--embedder", f"ViT-B-32@{tmp_path / 'none.pt'}")
    assert missing.exit_code == 1 and "none.pt" in missing.output


def test_commands_on_a_missing_lab_say_how_to_make_one(tmp_path):
    result = rsx(tmp_path / "nowhere", "generator", "list")
    assert result.exit_code == 1 and "rsx init" in result.output


def test_a_failed_init_leaves_nothing_behind(tmp_path):
    target = tmp_path / "new"
    result = rsx(target, "init", "--embedder", f"ViT-B-32@{tmp_path / 'none.safetensors'}")
    assert result.exit_code == 1
    assert not target.exists()
