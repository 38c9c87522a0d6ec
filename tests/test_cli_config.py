"""`rsx config get|set|history`: the settings that may change, checked, recorded with their time."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.cli import cli
from resynth_index.config import CHANGEABLE, DEFAULT_MARGIN_FLOOR, SETTINGS_FILE, LabSettings
from resynth_index.errors import StoreError


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def test_get_lists_every_changeable_setting_and_one_by_name(toy_lab: Path) -> None:
    listed = rsx(toy_lab, "config", "get")
    assert listed.exit_code == 0, listed.output
    assert [line.split(" = ")[0] for line in listed.output.splitlines()] == list(CHANGEABLE)
    assert "threshold = none" in listed.output
    assert f"margin_floor = {DEFAULT_MARGIN_FLOOR}" in listed.output
    one = rsx(toy_lab, "config", "get", "generation_batch_size")
    assert one.output == "auto\n"  # chosen per generator for the device
    as_json = json.loads(rsx(toy_lab, "config", "get", "--json").output)
    assert as_json["threshold"] is None and as_json["default_candidates"] is None


def test_set_changes_the_setting_and_history_records_each_change(toy_lab: Path) -> None:
    assert rsx(toy_lab, "config", "history").output == (
        "no settings changed since the lab was created\n"
    )
    done = rsx(toy_lab, "config", "set", "threshold", "0.35")
    assert done.exit_code == 0 and done.output == "threshold: none -> 0.35\n"
    assert rsx(toy_lab, "config", "set", "default_candidates", "toy-c, toy-a").exit_code == 0
    assert rsx(toy_lab, "config", "set", "margin_floor", "0").exit_code == 0
    assert rsx(toy_lab, "config", "set", "threshold", "none").exit_code == 0
    assert rsx(toy_lab, "config", "get", "default_candidates").output == "toy-c,toy-a\n"

    settings = LabSettings.load(toy_lab)
    assert settings.unknown_threshold is None and settings.margin_floor == 0.0
    assert settings.default_candidates == ["toy-c", "toy-a"]
    changes = [(c["key"], c["old"], c["new"]) for c in settings.changes]
    assert changes == [
        ("threshold", None, 0.35),
        ("default_candidates", None, ["toy-c", "toy-a"]),
        ("margin_floor", DEFAULT_MARGIN_FLOOR, 0.0),
        ("threshold", 0.35, None),
    ]
    for change in settings.changes:
        assert datetime.fromisoformat(change["at"]).tzinfo is not None  # a time, with its zone
    history = rsx(toy_lab, "config", "history").output.splitlines()
    assert len(history) == 4
    assert history[0].endswith("threshold: none -> 0.35")
    assert history[1].endswith("default_candidates: none -> toy-c,toy-a")
    lines = rsx(toy_lab, "config", "history", "--json").output.splitlines()
    assert [json.loads(line) for line in lines] == settings.changes
    assert [p.name for p in toy_lab.iterdir() if p.name.startswith(".")] == []  # no temp file


def test_setting_what_is_already_set_records_nothing(toy_lab: Path) -> None:
    again = rsx(toy_lab, "config", "set", "generation_batch_size", "auto")
    assert again.exit_code == 0 and "nothing changed" in again.output
    assert LabSettings.load(toy_lab).changes == []


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("threshold", "abc", "threshold must be a number at least 0, or none, not 'abc'"),
        ("threshold", "nan", "threshold must be a number at least 0"),
        ("threshold", "inf", "threshold must be a number at least 0"),
        ("margin_floor", "none", "margin_floor must be a number at least 0, not 'none'"),
        ("margin_floor", "-0.1", "margin_floor must be a number at least 0"),
        ("default_candidates", "toy-a,nope", "not an active generator: nope"),
        ("default_candidates", " , ", "default_candidates needs generator names"),
        ("captioner", "/no/such/folder", "captioner must be a local model folder"),
        ("generation_batch_size", "0", "generation_batch_size must be a whole number at least 1"),
        ("generation_batch_size", "none", "at least 1, or auto, not 'none'"),
        ("embedding_batch_size", "2.5", "embedding_batch_size must be a whole number at least 1"),
        ("default_resyntheses", "many", "default_resyntheses must be a whole number at least 1"),
    ],
)
def test_bad_values_are_refused_in_one_line_and_change_nothing(
    toy_lab: Path, key: str, value: str, message: str
) -> None:
    before = (toy_lab / SETTINGS_FILE).read_bytes()
    refused = rsx(toy_lab, "config", "set", key, value)
    assert refused.exit_code == 1
    assert message in refused.output
    assert refused.output.count("\n") == 1 and "Traceback" not in refused.output
    assert (toy_lab / SETTINGS_FILE).read_bytes() == before


def test_keys_that_may_not_change_are_refused(toy_lab: Path) -> None:
    before = (toy_lab / SETTINGS_FILE).read_bytes()
    refused = rsx(toy_lab, "config", "set", "distance", "euclidean")  # fixed with the lab
    assert refused.exit_code == 2 and "'distance' is not one of" in refused.output
    assert (toy_lab / SETTINGS_FILE).read_bytes() == before
    with pytest.raises(StoreError, match="'embedder_dim' cannot be changed"):
        LabSettings.load(toy_lab).change("embedder_dim", 3)


def test_a_retired_generator_cannot_become_a_default_candidate(toy_lab: Path) -> None:
    assert rsx(toy_lab, "generator", "remove", "toy-b").exit_code == 0
    refused = rsx(toy_lab, "config", "set", "default_candidates", "toy-b")
    assert refused.exit_code == 1 and "not an active generator: toy-b" in refused.output


def test_captioner_takes_a_folder_stored_as_an_absolute_path(toy_lab: Path, tmp_path) -> None:
    folder = tmp_path / "captioner"
    folder.mkdir()
    assert rsx(toy_lab, "config", "set", "captioner", str(folder)).exit_code == 0
    assert LabSettings.load(toy_lab).captioner == str(folder.resolve())
    assert rsx(toy_lab, "config", "set", "captioner", "NONE").exit_code == 0
    assert LabSettings.load(toy_lab).captioner is None


def test_settings_written_before_these_settings_existed_load_with_defaults(toy_lab: Path) -> None:
    path = toy_lab / SETTINGS_FILE
    raw = json.loads(path.read_text())
    for key in ("margin_floor", "default_candidates", "changes"):
        del raw[key]
    path.write_text(json.dumps(raw))
    settings = LabSettings.load(toy_lab)
    assert settings.margin_floor == DEFAULT_MARGIN_FLOOR
    assert settings.default_candidates is None and settings.changes == []
    assert rsx(toy_lab, "config", "set", "margin_floor", "0.01").exit_code == 0
    assert LabSettings.load(toy_lab).margin_floor == 0.01


def test_settings_files_with_bad_values_are_refused_on_load(toy_lab: Path) -> None:
    path = toy_lab / SETTINGS_FILE
    good = json.loads(path.read_text())
    for key, bad in [("margin_floor", -1), ("unknown_threshold", "high"), ("changes", {})]:
        path.write_text(json.dumps({**good, key: bad}))
        with pytest.raises(StoreError):
            LabSettings.load(toy_lab)


def test_config_without_a_lab_is_one_line(tmp_path: Path) -> None:
    missing = rsx(tmp_path / "nowhere", "config", "get")
    assert missing.exit_code == 1 and "no lab at" in missing.output
