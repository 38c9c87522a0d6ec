"""`rsx generator add/list/set/remove/restore` with real diffusers folders, including ones rsx did
not write, and the everyday traps around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.cli import cli


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


@pytest.mark.slow  # end to end through the CLI: not in the quick loop
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


@pytest.mark.slow  # end to end through the CLI: not in the quick loop
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


@pytest.mark.slow  # end to end through the CLI: not in the quick loop
def test_init_refuses_an_existing_lab_and_a_bad_embedder(toy_lab, tmp_path):
    again = rsx(toy_lab, "init")
    assert again.exit_code == 1 and "already an rsx lab" in again.output
    bad = rsx(tmp_path / "new", "init", "--embedder", "nonsense")
    assert bad.exit_code == 1 and "ARCH@WEIGHTS" in bad.output
    missing = rsx(tmp_path / "new2", "init", "--embedder", f"ViT-B-32@{tmp_path / 'none.pt'}")
    assert missing.exit_code == 1 and "none.pt" in missing.output


@pytest.mark.slow  # end to end through the CLI: not in the quick loop
def test_commands_on_a_missing_lab_say_how_to_make_one(tmp_path):
    result = rsx(tmp_path / "nowhere", "generator", "list")
    assert result.exit_code == 1 and "rsx init" in result.output


@pytest.mark.slow  # end to end through the CLI: not in the quick loop
def test_a_failed_init_leaves_nothing_behind(tmp_path):
    target = tmp_path / "new"
    result = rsx(target, "init", "--embedder", f"ViT-B-32@{tmp_path / 'none.safetensors'}")
    assert result.exit_code == 1
    assert not target.exists()


# ----------------------------------------------------------------- restore and set
def _listed(lab: Path, *flags: str) -> dict[str, dict]:
    result = rsx(lab, "generator", "list", "--json", *flags)
    return {g["name"]: g for g in map(json.loads, result.stdout.splitlines())}


def _query(lab: Path, image: Path, caption: str, *args: str) -> dict:
    result = rsx(lab, "query", str(image), "--caption", caption, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow  # queries end to end: not in the quick loop
def test_restore_makes_a_retired_generator_a_candidate_again(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", "a barn in snow")
    first = _query(toy_lab, image, "a barn in snow", "--candidates", "toy-a,toy-b")
    assert rsx(toy_lab, "generator", "remove", "toy-a").exit_code == 0

    refused = rsx(toy_lab, "query", str(image), "--candidates", "toy-a,toy-b")
    assert refused.exit_code == 1 and "rsx generator restore" in refused.output
    again = rsx(toy_lab, "generator", "add", "toy-a", "--toy", "11")
    assert again.exit_code == 1 and "rsx generator restore toy-a" in again.output

    restored = rsx(toy_lab, "generator", "restore", "toy-a")
    assert restored.exit_code == 0, restored.output
    assert _listed(toy_lab)["toy-a"]["retired_at"] is None
    answer = _query(toy_lab, image, "a barn in snow", "--candidates", "toy-a,toy-b")
    assert answer["candidates"] == ["toy-a", "toy-b"]
    assert answer["generated"] == 0 and answer["reused"] == 2  # its old resyntheses count again
    assert answer["ranking"] == first["ranking"]

    twice = rsx(toy_lab, "generator", "restore", "toy-a")
    assert twice.exit_code == 1 and "not retired" in twice.output
    unknown = rsx(toy_lab, "generator", "restore", "ghost")
    assert unknown.exit_code == 1 and "no generator named 'ghost'" in unknown.output


@pytest.mark.slow  # queries end to end: not in the quick loop
def test_set_gives_a_new_cache_key_so_a_query_regenerates_and_old_rows_remain(
    toy_lab, make_toy_image
):
    from sqlalchemy import select

    from resynth_index.lab import Lab
    from resynth_index.store.models import GeneratorRow, QueryRow, ResynthesisRow

    image = make_toy_image("toy-a", "a barn in snow")
    old = _query(toy_lab, image, "a barn in snow", "--candidates", "toy-a")
    assert old["generated"] == 1
    before = _listed(toy_lab)["toy-a"]

    changed = rsx(toy_lab, "generator", "set", "toy-a", "--steps", "3", "--resyntheses", "2")
    assert changed.exit_code == 0, changed.output
    assert "steps 4 -> 3" in changed.output and "K 1 -> 2" in changed.output
    assert "settings hash" in changed.output
    after = _listed(toy_lab)["toy-a"]
    assert after["settings"]["generation"]["steps"] == 3
    assert after["settings"]["resyntheses"] == 2
    assert after["fingerprint"] != before["fingerprint"]
    [change] = after["settings"]["settings_history"]
    assert change["from"]["generation"]["steps"] == 4 and change["to"]["generation"]["steps"] == 3
    assert change["from"]["fingerprint"] == before["fingerprint"]
    assert change["to"]["fingerprint"] == after["fingerprint"]
    assert change["at"]

    new = _query(toy_lab, image, "a barn in snow", "--candidates", "toy-a")
    assert new["generated"] == 2 and new["reused"] == 0  # the new settings' own resyntheses
    assert new["fingerprints"]["toy-a"] == after["fingerprint"]  # it loaded: fingerprint agrees
    with Lab.open(toy_lab) as lab, lab.session() as session:
        rows = session.execute(
            select(ResynthesisRow.settings_hash, ResynthesisRow.seed)
            .join(GeneratorRow, GeneratorRow.id == ResynthesisRow.generator_id)
            .where(GeneratorRow.name == "toy-a")
        ).all()
        old_answer = session.scalar(
            select(QueryRow.result_json).where(QueryRow.id == old["query_id"])
        )
        assert lab.blobs.exists(old["ranking"][0]["nearest_sha256"])  # still there to show
    assert len({settings for settings, _ in rows}) == 2  # old and new settings, side by side
    assert sorted(seed for _, seed in rows) == [0, 0, 1]
    assert json.loads(old_answer)["fingerprints"]["toy-a"] == before["fingerprint"]

    rerun = _query(toy_lab, image, "a barn in snow", "--candidates", "toy-a")
    assert rerun["generated"] == 0 and rerun["reused"] == 2

    # the old answer still shows, with the resynthesis the old settings made
    shown = rsx(toy_lab, "show", str(old["query_id"]), "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout) == json.loads(old_answer)
    report = toy_lab.parent / "old.html"
    rendered = rsx(toy_lab, "show", str(old["query_id"]), "--report", str(report))
    assert rendered.exit_code == 0, rendered.output
    assert "image missing from the blob store" not in report.read_text()


def test_set_refuses_invalid_values_and_changes_nothing(toy_lab, tmp_path):
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    before = _listed(toy_lab)
    refusals = [
        (["mj", "--steps", "10"], 1, "only --resyntheses"),
        (["toy-a", "--size", "65x64"], 2, "multiples of 8"),
        (["toy-a", "--size", "big"], 2, "WIDTHxHEIGHT"),
        (["toy-a", "--steps", "0"], 2, "--steps"),
        (["toy-a", "--guidance", "nan"], 2, "not a finite number"),
        (["toy-a", "--dtype", "float8"], 2, "--dtype"),
        (["toy-a", "--scheduler", "NoSuchScheduler"], 1, "unknown scheduler"),
        (["toy-a", "--resyntheses", "0"], 2, "--resyntheses"),
        (["toy-a"], 2, "give at least one setting"),
        (["ghost", "--steps", "3"], 1, "no generator named 'ghost'"),
    ]
    for args, code, message in refusals:
        result = rsx(toy_lab, "generator", "set", *args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output, (args, result.output)
    same = rsx(toy_lab, "generator", "set", "toy-a", "--steps", "4")
    assert same.exit_code == 0 and "nothing changed" in same.output
    assert _listed(toy_lab) == before

    # a generator whose files changed since it was registered is not re-registered by set
    config = toy_lab / "models" / "toy-toy-b" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text() + "\n")
    changed_files = rsx(toy_lab, "generator", "set", "toy-b", "--steps", "3")
    assert changed_files.exit_code == 1 and "no longer matches" in changed_files.output
    assert _listed(toy_lab) == before

    k = rsx(toy_lab, "generator", "set", "mj", "--resyntheses", "3")
    assert k.exit_code == 0 and "K 1 -> 3" in k.output
    assert _listed(toy_lab)["mj"]["fingerprint"] == before["mj"]["fingerprint"]


# ----------------------------------------------------------------- small things
def test_generator_list_has_a_header_and_the_settings_columns(toy_lab):
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    assert rsx(toy_lab, "generator", "remove", "toy-c").exit_code == 0
    lines = rsx(toy_lab, "generator", "list", "--all").stdout.splitlines()
    header = lines[0].split()
    assert header == [
        "NAME", "KIND", "STEPS", "GUIDANCE", "SIZE", "K", "STATUS", "FINGERPRINT", "SOURCE"
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["toy-a"][1:7] == ["toy", "4", "3", "64x64", "1", "active"]
    assert rows["mj"][1:7] == ["imported", "-", "-", "-", "1", "active"]
    assert rows["toy-c"][6] == "retired"
    assert lines[0].index("KIND") == lines[1].index(rows[lines[1].split()[0]][1])  # aligned
    assert "toy-c" not in rsx(toy_lab, "generator", "list").stdout


def test_dtype_has_help_text():
    for command in ("add", "set"):
        result = CliRunner().invoke(cli, ["generator", command, "--help"])
        words = " ".join(result.output.split())  # help text wraps to the terminal's width
        assert "--dtype [auto|float32|float16|bfloat16] Weights' precision" in words
        assert "float16 on CUDA, float32 elsewhere" in words
        assert "Example" in result.output
    assert "Example" in CliRunner().invoke(cli, ["generator", "restore", "--help"]).output


def test_a_global_option_after_the_command_gets_a_hint(toy_lab):
    result = CliRunner().invoke(cli, ["query", "--lab", str(toy_lab), "x.png"])
    assert result.exit_code == 2
    assert "No such option" in result.output
    assert "(--lab and --device go before the command: rsx --lab X query ...)" in result.output
    nested = CliRunner().invoke(cli, ["generator", "list", "--device", "cpu"])
    assert nested.exit_code == 2
    assert nested.output.count("--lab and --device go before the command") == 1
    assert "rsx --device X generator list ..." in nested.output
    other = CliRunner().invoke(cli, ["query", "--nope", "x.png"])
    assert "go before the command" not in other.output


def test_a_bad_image_is_named_once(toy_lab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("fake.png").write_bytes(b"not an image at all")
    result = rsx(toy_lab, "query", "fake.png", "--caption", "x")
    assert result.exit_code == 1
    [line] = [x for x in result.output.splitlines() if x.startswith("failed:")]
    assert line == "failed: fake.png: not an image in a supported format"
    as_json = rsx(toy_lab, "query", "fake.png", "--caption", "x", "--json")
    assert json.loads(as_json.stdout.splitlines()[0]) == {
        "image": "fake.png",
        "error": "not an image in a supported format",
    }
    ingested = rsx(toy_lab, "ingest", "fake.png")
    assert "failed: fake.png: not an image in a supported format" in ingested.output
