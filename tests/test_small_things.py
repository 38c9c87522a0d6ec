"""Small things a new user met on the command line and the page (issue 30): the demo's last line,
`rsx generator retire`, `rsx show` of the latest answer, plurals in `rsx info`, an empty work
order, `--no-generate` and work orders, the report's lab path, the pixel limit's way out, the
query form's ticked candidates, the history page, and the demo lab named where a lab is missing.

Each test builds only what it needs (toy lab copies, answers recorded straight into the audit):
no generation runs here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from resynth_index.attribution.answer import QueryResult
from resynth_index.cli import cli
from resynth_index.hashing import hash_bytes
from resynth_index.lab import Lab
from resynth_index.store import audit, calibrations, repository


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def record(lab_dir: Path, image: str, verdict: str = "toy-a", margin: float | None = 0.375) -> int:
    """Record one answer in the audit as a query would, without running one; its query id."""
    caption = f"a caption of {image}"
    answer = QueryResult.from_json(
        {
            "image": image,
            "sha256": hash_bytes(image.encode()),
            "caption": caption,
            "caption_source": "explicit",
            "verdict": verdict,
            "ranking": [{"generator": "toy-a", "distance": 0.125, "score": 1.0}],
            "margin": margin,
            "candidates": ["toy-a", "toy-b"],
        }
    ).to_json()
    caption_hash = hash_bytes(caption.encode())
    with Lab.open(lab_dir) as lab, lab.session() as session:
        repository.ensure_caption(session, caption_hash, caption)
        return audit.record_query(
            session, answer=answer, caption_hash=caption_hash, distances={"toy-a": [0.125]}
        )


def calibrate_by_hand(lab_dir: Path, candidates: list[str], method: str = "resynthesis") -> int:
    """Save a calibration record of ``candidates`` (its content is not read here); its id."""
    with Lab.open(lab_dir) as lab, lab.session() as session:
        new_id, _ = calibrations.save_calibration(
            session,
            method=method,
            coverage=0.9,
            per_generator=False,
            candidates=candidates,
            embedder_fingerprint=lab.fingerprint,
            record={},
            settings={},
            summary={},
        )
    return new_id


# ----------------------------------------------------------------------------- rsx demo
def test_the_demo_says_how_to_open_its_lab_with_or_without_the_serve_extra(
    tmp_path: Path, monkeypatch
) -> None:
    from resynth_index import demo

    lab = tmp_path / "demo lab"
    without = demo.serve_line(lab, installed=False)
    assert "pip install 'resynth-index[serve]'" in without
    assert without.endswith(f"then: rsx --lab '{lab}' serve")
    assert (
        demo.serve_line(lab, installed=True)
        == f"open it in the web service: rsx --lab '{lab}' serve"
    )

    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: 1.0)  # no toy zoo here
    monkeypatch.setattr(demo, "serve_extra_installed", lambda: False)
    ran = rsx(lab, "demo")
    assert ran.exit_code == 0, ran.output
    assert "pip install 'resynth-index[serve]'" in ran.stdout.splitlines()[-1]
    monkeypatch.setattr(demo, "serve_extra_installed", lambda: True)
    assert rsx(lab, "demo").stdout.splitlines()[-1].startswith("open it in the web service: ")


def test_a_missing_lab_can_point_at_the_demo_lab(tmp_path: Path, monkeypatch) -> None:
    from resynth_index import config
    from resynth_index.config import SETTINGS_FILE

    monkeypatch.setattr(config, "default_lab_dir", lambda: tmp_path / "rsx" / "lab")
    demo_lab = tmp_path / "rsx" / "demo-lab"
    assert config.demo_lab_dir() == demo_lab
    assert config.demo_lab_hint(tmp_path / "rsx" / "lab") is None  # no demo run yet
    demo_lab.mkdir(parents=True)
    (demo_lab / SETTINGS_FILE).write_text("{}")
    assert config.demo_lab_hint(tmp_path / "rsx" / "lab") == (
        f"or use the demo's lab: rsx --lab {demo_lab} query ..."
    )
    assert config.demo_lab_hint(demo_lab) is None  # the missing lab is the demo's own


# ----------------------------------------------------------------------------- rsx generator
def test_generator_retire_is_remove_and_the_help_shows_it(toy_lab: Path) -> None:
    listed = rsx(toy_lab, "generator", "--help").stdout
    assert "retire " in listed and "Alias of 'remove'" in listed
    retired = rsx(toy_lab, "generator", "retire", "toy-c")
    assert retired.exit_code == 0 and retired.stdout == "retired generator toy-c\n"
    with Lab.open(toy_lab) as lab:
        assert [row.name for row in lab.generators()] == ["toy-a", "toy-b"]
    assert rsx(toy_lab, "generator", "restore", "toy-c").exit_code == 0


# ----------------------------------------------------------------------------- rsx show, info
def test_show_without_an_id_shows_the_latest_answer(toy_lab: Path) -> None:
    nothing = rsx(toy_lab, "show")
    assert nothing.exit_code == 1 and "no queries recorded yet" in nothing.output
    record(toy_lab, "first.png")
    latest = record(toy_lab, "second.png", verdict="toy-b")
    shown = rsx(toy_lab, "show", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["query_id"] == latest
    table = rsx(toy_lab, "show")
    assert table.stdout.startswith("second.png") and f"query {latest}" in table.stdout


def test_info_counts_agree_with_their_nouns(toy_lab: Path) -> None:
    record(toy_lab, "only.png")
    table = rsx(toy_lab, "info")
    assert table.exit_code == 0, table.output
    lines = {line.split()[0]: line for line in table.stdout.splitlines()}
    assert "0 images, 1 caption, 0 resyntheses" in lines["counts"]
    assert "1 query, 0 pending work orders" in lines["counts"]
    assert "index/ " in lines["disk"] and "(1 file)" in lines["disk"]  # rsx init's empty index
    assert "1 files" not in table.stdout and "0 vectors" in lines["index"]


# ----------------------------------------------------------------------------- work orders
def test_export_prompts_with_nothing_pending_keeps_the_csv_valid_and_says_so(
    toy_lab: Path, tmp_path: Path
) -> None:
    printed = rsx(toy_lab, "export-prompts")
    assert printed.exit_code == 0
    assert printed.stdout.splitlines() == ["generator,caption_hash,caption,role,path"]
    assert printed.stderr == "no pending work orders: the CSV holds the header only\n"
    out = tmp_path / "todo.csv"
    written = rsx(toy_lab, "export-prompts", "--out", str(out))
    assert written.stdout == "" and f"no pending work orders: {out} holds" in written.stderr
    assert out.read_text().startswith("generator,caption_hash")


def test_no_generate_records_no_work_order(toy_lab: Path, make_toy_image) -> None:
    from resynth_index.pipeline.query import run_queries
    from resynth_index.pipeline.work_orders import pending_work

    image = make_toy_image("toy-a", "a lighthouse")
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    with Lab.open(toy_lab) as lab:
        [stored] = run_queries(
            lab, [image], caption="a lighthouse", candidates=["mj"], generate=False
        )
        assert isinstance(stored, QueryResult) and stored.pending == ["mj"]
        assert pending_work(lab) == []  # stored resyntheses only: nothing was asked of mj
        run_queries(lab, [image], caption="a lighthouse", candidates=["mj"])
        assert [(o.generator, o.caption) for o in pending_work(lab)] == [("mj", "a lighthouse")]


# ----------------------------------------------------------------------------- the report, images
def test_the_report_names_the_lab_by_its_absolute_path(toy_lab: Path, monkeypatch) -> None:
    from resynth_index.report import render_report

    monkeypatch.chdir(toy_lab.parent)
    with Lab.open(Path(toy_lab.name)) as lab:
        page = render_report(lab, [])
    assert f"0 images; lab {toy_lab.resolve()}; written" in page


def test_an_image_over_the_pixel_limit_says_how_to_raise_it(tmp_path: Path) -> None:
    from hostile_files import png_declaring

    from resynth_index.errors import ImageError
    from resynth_index.media.images import load_image_bytes

    with pytest.raises(ImageError) as refused:
        load_image_bytes(png_declaring(5000, 5000), "big.png", max_pixels=1_000_000)
    assert "over the 1,000,000 limit" in str(refused.value)
    assert "rsx config set max_pixels" in str(refused.value)


# ----------------------------------------------------------------------------- the page
def test_the_query_form_ticks_the_default_else_the_calibrated_set(toy_lab: Path) -> None:
    from resynth_index.service import page, records

    with Lab.open(toy_lab) as lab:
        plain = records.query_form(lab)
    assert plain.candidates == plain.checked == ["toy-a", "toy-b", "toy-c"]
    assert plain.calibration_note is None

    calibrate_by_hand(toy_lab, ["toy-a", "toy-b", "toy-c"])
    calibrate_by_hand(toy_lab, ["toy-b", "toy-a"], method="fused")  # not a prediction set
    newest = calibrate_by_hand(toy_lab, ["toy-b", "toy-a"])
    with Lab.open(toy_lab) as lab:
        form = records.query_form(lab)
    assert form.checked == ["toy-a", "toy-b"]
    assert form.calibration_note == (
        f"Calibration #{newest} (90 % coverage) was made for the candidates toy-a, toy-b: with"
        " exactly these ticked, the answer gets a prediction set."
    )
    html = page.query_page(
        form.candidates, "token", checked=form.checked, calibration_note=form.calibration_note
    )
    assert 'value="toy-a" checked>' in html and 'value="toy-c">' in html
    assert f"Calibration #{newest} (90 % coverage)" in html
    assert page.query_page(["toy-a"], "token").count(" checked>") == 1  # all, as before

    assert rsx(toy_lab, "config", "set", "default_candidates", "toy-c,toy-a").exit_code == 0
    with Lab.open(toy_lab) as lab:
        chosen = records.query_form(lab)
    assert chosen.checked == ["toy-c", "toy-a"]
    assert chosen.calibration_note is not None
    assert chosen.calibration_note.endswith(
        "tick exactly these for an answer with a prediction set."
    )


def test_the_history_page_shows_file_thumbnail_margin_and_filters_by_verdict(
    toy_lab: Path,
) -> None:
    from resynth_index.service import page, records

    first = record(toy_lab, "/cases/7/suspect <1>.png", verdict="toy-a", margin=0.0625)
    second = record(toy_lab, "other.png", verdict="unknown", margin=None)
    with Lab.open(toy_lab) as lab:
        everything = records.history(lab)
        only = records.history(lab, verdict="toy-a", limit=1)
        by_text = records.history(lab, "caption of", verdict="unknown")
    assert [e["query_id"] for e in everything.entries] == [second, first]
    assert [e["margin"] for e in everything.entries] == [None, 0.0625]
    assert (only.total, [e["query_id"] for e in only.entries]) == (1, [first])
    assert only.to_json()["verdict"] == "toy-a"
    assert [e["query_id"] for e in by_text.entries] == [second]

    html = page.history_page(only)
    sha = hash_bytes(b"/cases/7/suspect <1>.png")
    assert f'<img class="thumb small" src="/v1/images/{sha}"' in html
    assert (
        '<span class="file" title="/cases/7/suspect &lt;1&gt;.png">suspect &lt;1&gt;.png<' in html
    )
    assert '<td class="margin">0.0625</td>' in html
    assert 'name="verdict" id="verdict-filter" value="toy-a"' in html
    assert '<td class="id">' in html
    many = records.HistoryPage(5, 2, 2, "", only.entries, "toy-a")
    links = page.history_page(many)
    assert "verdict=toy-a" in links.split('class="paging"')[1]  # paging keeps the filter


def test_the_answer_page_links_the_readable_audit_record() -> None:
    from resynth_index.service import page

    html = page.answer_page({"query_id": 7, "sha256": "a" * 64, "verdict": "toy-a"})
    assert '<a id="audit" href="/v1/queries/7?pretty=1">' in html
