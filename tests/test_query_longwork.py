"""Long queries: progress events, the generation plan and its cap, Ctrl-C, the report path,
folders and sidecar files among the paths (issue 17)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.attribution.answer import QueryFailure
from resynth_index.cli import cli, generation
from resynth_index.cli.app import StatusLine
from resynth_index.config import LabSettings
from resynth_index.lab import Lab
from resynth_index.media.captions import caption_hash
from resynth_index.pipeline.plans import PlannedGenerations, plan_resyntheses
from resynth_index.pipeline.query import expand_query_paths, run_queries

CAPTION = "a lighthouse on a cliff at dusk"


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def blob_files(lab: Path) -> list[Path]:
    return sorted(p for p in (lab / "blobs").rglob("*") if p.is_file())


def set_batch_size(lab: Path, size: int) -> None:
    settings = LabSettings.load(lab)
    settings.generation_batch_size = size
    settings.save(lab)


def stored_by(lab: Path, generator: str, resyntheses: int) -> tuple[int, int]:
    """(stored, missing) resyntheses of CAPTION by ``generator`` with K = ``resyntheses``."""
    with Lab.open(lab) as opened:
        rows = [r for r in opened.generators() if r.name == generator]
        plan = plan_resyntheses(opened, [caption_hash(CAPTION)], rows, resyntheses)
    return len(plan.stored[(caption_hash(CAPTION), generator)]), plan.missing_count()


# --------------------------------------------------------------------------- library level


@pytest.mark.slow
def test_progress_events_name_stage_and_generator_in_order(toy_lab, make_toy_image):
    first = make_toy_image("toy-a", CAPTION)
    second = make_toy_image("toy-b", CAPTION)
    events, plans = [], []
    with Lab.open(toy_lab) as lab:
        lab.settings.generation_batch_size = 2
        results = run_queries(
            lab,
            [first, second],
            caption=CAPTION,
            candidates=["toy-a", "toy-b"],
            resyntheses=3,
            progress=events.append,
            on_plan=plans.append,
        )
    assert not [r for r in results if isinstance(r, QueryFailure)]
    assert [(e.stage, e.generator, e.done, e.total) for e in events] == [
        ("load", None, 1, 2),
        ("load", None, 2, 2),
        ("generate", "toy-a", 0, 3),
        ("generate", "toy-a", 2, 3),
        ("generate", "toy-a", 3, 3),
        ("generate", "toy-b", 0, 3),
        ("generate", "toy-b", 2, 3),
        ("generate", "toy-b", 3, 3),
        ("embed", None, 0, 8),  # the two query images and six resyntheses
        ("embed", None, 8, 8),
    ]
    assert plans == [
        PlannedGenerations(
            total=6,
            generators=("toy-a", "toy-b"),
            resyntheses={"toy-a": 3, "toy-b": 3},
            captions=1,
            stored=0,
        )
    ]


@pytest.mark.slow
def test_the_plan_counts_only_what_is_missing(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    with Lab.open(toy_lab) as lab:
        run_queries(lab, [image], caption=CAPTION, candidates=["toy-a"], resyntheses=2)
        plans: list[PlannedGenerations] = []
        events = []
        run_queries(
            lab,
            [image],
            caption=CAPTION,
            candidates=["toy-a", "toy-b"],
            resyntheses=3,
            on_plan=plans.append,
            progress=events.append,
        )
    assert plans == [
        PlannedGenerations(
            total=4,  # toy-a's third seed, toy-b's three
            generators=("toy-a", "toy-b"),
            resyntheses={"toy-a": 3, "toy-b": 3},
            captions=1,
            stored=2,
        )
    ]
    generated = [(e.generator, e.done, e.total) for e in events if e.stage == "generate"]
    assert generated == [("toy-a", 0, 1), ("toy-a", 1, 1), ("toy-b", 0, 3), ("toy-b", 3, 3)]


@pytest.mark.slow
def test_a_refused_plan_leaves_nothing_written(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    before = blob_files(toy_lab)

    def refuse(planned: PlannedGenerations) -> None:
        raise RuntimeError(f"refused {planned.total}")

    with Lab.open(toy_lab) as lab, pytest.raises(RuntimeError, match="refused 9"):
        run_queries(lab, [image], caption=CAPTION, resyntheses=3, on_plan=refuse)
    assert blob_files(toy_lab) == before
    assert stored_by(toy_lab, "toy-a", 3) == (0, 3)


def test_folders_are_walked_and_sidecars_skipped(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "a.png.txt", "a.txt", "notes.json", "list.csv", "readme.md"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub" / "b.JPG").write_bytes(b"x")
    (tmp_path / "sub" / "b.txt").write_bytes(b"x")
    assert expand_query_paths([tmp_path]) == [tmp_path / "a.png", tmp_path / "sub" / "b.JPG"]
    given = sorted(tmp_path.iterdir())  # what `rsx query DIR/*` passes
    assert expand_query_paths(given) == [
        tmp_path / "a.png",
        tmp_path / "readme.md",  # not a sidecar: loading it says what is wrong
        tmp_path / "sub" / "b.JPG",
    ]
    assert expand_query_paths([tmp_path / "gone.png"]) == [tmp_path / "gone.png"]


@pytest.mark.slow
def test_a_latin1_sidecar_fails_its_image_alone(toy_lab, make_toy_image):
    good = make_toy_image("toy-a", CAPTION, name="good.png")
    (good.parent / "good.txt").write_text(CAPTION, encoding="utf-8")
    bad = make_toy_image("toy-b", CAPTION, name="bad.png")
    (bad.parent / "bad.txt").write_bytes("vieux pêcheur".encode("latin-1"))
    with Lab.open(toy_lab) as lab:
        failure, answer = run_queries(lab, [bad, good], candidates=["toy-a"], resyntheses=1)
    assert failure == QueryFailure(
        image=str(bad), error="sidecar bad.txt is not UTF-8 text; re-save it as UTF-8"
    )
    assert answer.caption == CAPTION and answer.caption_source == "sidecar:good.txt"


# --------------------------------------------------------------------------- terminal output


def test_status_line_shows_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        with StatusLine(stream) as status:
            status.show("toy-a: generating 3 of 12")
    assert "toy-a: generating 3 of 12" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r\x1b[K")  # cleared when done
    assert pipe.getvalue() == ""


@pytest.mark.slow
def test_piped_query_shows_the_plan_and_no_progress(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    result = rsx(toy_lab, "query", str(image), "--caption", CAPTION, "--resyntheses", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "planning 6 generations (3 generators x 2 resyntheses x 1 caption)"
    ]
    for trace in ("generating", "loading", "embedding", "\r", "\x1b"):
        assert trace not in result.output
    again = rsx(toy_lab, "query", str(image), "--caption", CAPTION, "--resyntheses", "2")
    assert again.exit_code == 0 and again.stderr == ""  # nothing to generate: no plan line


# --------------------------------------------------------------------------- the cap


@pytest.mark.slow
def test_a_plan_over_the_cap_is_refused_until_yes(toy_lab, make_toy_image, monkeypatch):
    monkeypatch.setattr(generation, "GENERATION_CAP", 5)
    image = make_toy_image("toy-a", CAPTION)
    before = blob_files(toy_lab)
    args = ["query", "--json", str(image), "--caption", CAPTION, "--resyntheses", "2"]
    refused = rsx(toy_lab, *args)
    assert refused.exit_code == 1
    assert refused.stderr.splitlines() == [
        "planning 6 generations (3 generators x 2 resyntheses x 1 caption)",
        "Error: 6 generations is more than the 5 a query makes without asking; pass --yes to "
        "go ahead, or lower --resyntheses or --candidates",
    ]
    assert refused.stdout == ""
    assert blob_files(toy_lab) == before  # neither the query image nor any resynthesis
    assert stored_by(toy_lab, "toy-a", 2) == (0, 2)

    allowed = rsx(toy_lab, *args, "--yes")
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["generated"] == 6


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_says_what_was_kept_and_exits_130(toy_lab, make_toy_image, monkeypatch):
    image = make_toy_image("toy-a", CAPTION)
    set_batch_size(toy_lab, 2)
    with Lab.open(toy_lab) as lab:
        row = next(r for r in lab.generators() if r.name == "toy-a")
        model_class = type(lab.generator_model(row))
    real_generate = model_class.generate
    calls = []

    def generate_then_interrupt(self, requests, *args, **kwargs):
        calls.append(len(requests))
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_generate(self, requests, *args, **kwargs)

    monkeypatch.setattr(model_class, "generate", generate_then_interrupt)
    args = ["query", "--json", str(image), "--caption", CAPTION, "--candidates", "toy-a"]
    interrupted = rsx(toy_lab, *args, "--resyntheses", "4")
    assert interrupted.exit_code == 130
    assert calls == [2, 2]
    assert interrupted.stderr.splitlines()[-1] == (
        "interrupted: 2 resyntheses stored; rerun to continue"
    )
    assert "Aborted" not in interrupted.output
    assert stored_by(toy_lab, "toy-a", 4) == (2, 2)  # the first batch, whole

    monkeypatch.setattr(model_class, "generate", real_generate)
    rerun = rsx(toy_lab, *args, "--resyntheses", "4")
    assert rerun.exit_code == 0, rerun.output
    answer = json.loads(rerun.stdout)
    assert (answer["generated"], answer["reused"]) == (2, 2)


# --------------------------------------------------------------------------- --report


def test_a_report_in_a_missing_folder_is_refused_before_any_work(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    before = blob_files(toy_lab)
    target = image.parent / "nodir" / "x.html"
    result = rsx(toy_lab, "query", str(image), "--caption", CAPTION, "--report", str(target))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: cannot write the report {target}: folder {target.parent} does not exist\n"
    )
    assert blob_files(toy_lab) == before


def test_an_existing_report_is_kept_without_force(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    target = image.parent / "r.html"
    target.write_text("earlier report", encoding="utf-8")
    before = blob_files(toy_lab)
    result = rsx(toy_lab, "query", str(image), "--caption", CAPTION, "--report", str(target))
    assert result.exit_code == 1
    assert result.stderr == f"Error: report {target} already exists; pass --force to replace it\n"
    assert target.read_text(encoding="utf-8") == "earlier report"
    assert blob_files(toy_lab) == before


@pytest.mark.slow
def test_force_replaces_an_existing_report(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", CAPTION)
    target = image.parent / "r.html"
    target.write_text("earlier report", encoding="utf-8")
    args = ["query", str(image), "--caption", CAPTION, "--resyntheses", "1"]
    result = rsx(toy_lab, *args, "--report", str(target), "--force")
    assert result.exit_code == 0, result.output
    assert "<html" in target.read_text(encoding="utf-8").lower()


def test_no_report_when_every_image_failed(toy_lab, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    target = tmp_path / "r.html"
    result = rsx(toy_lab, "query", str(broken), "--caption", CAPTION, "--report", str(target))
    assert result.exit_code == 1
    assert f"no report written to {target}: every image failed" in result.stderr.splitlines()
    assert not target.exists()


# --------------------------------------------------------------------------- folders


@pytest.mark.slow
def test_query_a_folder_with_sidecars(toy_lab, make_toy_image):
    folder = toy_lab.parent / "shots"
    folder.mkdir()
    image = make_toy_image("toy-a", CAPTION, name="shots/x.png")
    (folder / "x.txt").write_text("another caption", encoding="utf-8")
    (folder / "x.png.txt").write_text(CAPTION, encoding="utf-8")
    (folder / "notes.json").write_text("{}", encoding="utf-8")
    args = ["query", "--json", "--candidates", "toy-a", "--resyntheses", "1"]
    whole = rsx(toy_lab, *args, str(folder))
    swept = rsx(toy_lab, *args, *[str(p) for p in sorted(folder.iterdir()) if p.is_file()])
    for result in (whole, swept):
        assert result.exit_code == 0, result.output
        assert "failed" not in result.output
        [answer] = [json.loads(line) for line in result.stdout.splitlines()]
        assert answer["image"] == str(image)
        assert answer["caption"] == CAPTION
        assert answer["caption_source"] == "sidecar:x.png.txt (x.txt also present)"


def test_paths_without_any_image_are_one_line_error(toy_lab, tmp_path):
    (tmp_path / "only.txt").write_text("a caption", encoding="utf-8")
    result = rsx(toy_lab, "query", str(tmp_path / "only.txt"), "--caption", CAPTION)
    assert result.exit_code == 1
    assert result.stderr == "Error: no image files among the paths given\n"
