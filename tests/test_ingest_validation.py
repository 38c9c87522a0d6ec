"""`rsx ingest` checks its arguments and inputs before loading any model, says each problem once,
refuses edited work-order captions, takes --seed for plain files, and survives Ctrl-C."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hostile_files import interrupt_the_second_batch
from PIL import Image
from sqlalchemy import select

from resynth_index.cli import cli
from resynth_index.lab import Lab
from resynth_index.media.captions import caption_hash
from resynth_index.pipeline import ingest as ingest_module
from resynth_index.pipeline import ingest_items
from resynth_index.pipeline.ingest_items import CAPTION_HASH_MISMATCH, IngestFailure, read_manifest
from resynth_index.pipeline.work_orders import WorkOrder, pending_work, write_work_orders
from resynth_index.store import repository
from resynth_index.store.models import GeneratorRow, ImageRow, ResynthesisRow


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def noise_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` distinct small PNGs (random pixels, so each has its own content hash)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img-{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def no_models(monkeypatch):
    """Loading the lab's embedder fails the test: what runs must not need it."""

    def refuse(self):
        raise AssertionError("the embedder was loaded")

    monkeypatch.setattr(Lab, "_load_embedder", refuse)


def _work_order_csv(path: Path, orders: list[WorkOrder], paths: list[Path]) -> Path:
    """An exported work order, as a person fills it in: each row's ``path`` given."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        write_work_orders(orders, handle)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row, image in zip(rows, paths, strict=True):
        row["path"] = str(image)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------- checked before any model loads
def test_a_role_without_its_generator_is_said_once_before_any_model_loads(
    toy_lab, tmp_path, no_models
):
    images = noise_images(tmp_path / "in", 3)
    result = rsx(toy_lab, "ingest", *map(str, images), "--role", "reference")
    assert result.exit_code == 2
    assert result.output.count("--role reference needs --generator") == 1
    assert "failed:" not in result.output


def test_an_unknown_generator_or_a_missing_seed_is_said_once(toy_lab, tmp_path, no_models):
    images = list(map(str, noise_images(tmp_path / "in", 3)))
    unknown = rsx(toy_lab, "ingest", *images, "--role", "reference", "--generator", "ghost")
    assert unknown.exit_code == 1
    assert unknown.output.count("unknown generator 'ghost'") == 1
    args = ["--role", "resynthesis", "--generator", "toy-a", "--caption", "a cat"]
    no_seed = rsx(toy_lab, "ingest", *images, *args)
    assert no_seed.exit_code == 1
    assert no_seed.output.count("needs the seed it was made with: give --seed N") == 1
    wrong_role = rsx(toy_lab, "ingest", *images, "--seed", "3")
    assert wrong_role.exit_code == 2 and "--seed goes with --role resynthesis" in wrong_role.output
    query_generator = rsx(toy_lab, "ingest", *images, "--generator", "toy-a")
    assert query_generator.exit_code == 2
    assert "--generator goes with --role reference or --role resynthesis" in query_generator.output


def test_an_empty_folder_or_a_pattern_matching_nothing_exits_nonzero(toy_lab, tmp_path, no_models):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    result = rsx(toy_lab, "ingest", str(empty))
    assert result.exit_code == 1
    assert f"no images found in {empty}" in result.output
    assert len(result.output.strip().splitlines()) == 1

    pattern = str(tmp_path / "refs" / "*.png")  # what a shell passes on when nothing matched
    unmatched = rsx(toy_lab, "ingest", pattern)
    assert unmatched.exit_code == 1
    assert f"no images found matching {pattern}" in unmatched.output

    missing = rsx(toy_lab, "ingest", str(tmp_path / "nope.png"))
    assert missing.exit_code == 1
    assert "nope.png: no such file or folder" in missing.output
    assert "0 added, 0 skipped (already present), 1 failed" in missing.output


def test_manifest_lines_the_store_would_refuse_fail_without_loading_a_model(
    toy_lab, tmp_path, no_models
):
    [image] = noise_images(tmp_path, 1)
    lines = [
        {"path": image.name, "role": "reference"},
        {"path": image.name, "role": "reference", "generator": "ghost"},
        {"path": image.name, "role": "resynthesis", "generator": "toy-a", "caption": "a cat"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = rsx(toy_lab, "ingest", str(manifest))
    assert result.exit_code == 1
    assert "0 added, 0 skipped (already present), 3 failed" in result.output
    assert "a reference needs a generator" in result.output
    assert "unknown generator 'ghost'" in result.output
    assert "needs its seed" in result.output


def test_an_empty_folder_or_a_missing_path_among_others_is_one_failure_each(tmp_path):
    """Among other paths, each input naming nothing is one failure; the others still go on."""
    empty = tmp_path / "empty"
    empty.mkdir()
    [image] = noise_images(tmp_path / "in", 1)
    items = list(ingest_items.expand_paths([empty, tmp_path / "gone.png", tmp_path / "in"]))
    assert items == [
        IngestFailure(str(empty), ingest_items.NO_IMAGES_IN_FOLDER),
        IngestFailure(str(tmp_path / "gone.png"), "no such file or folder"),
        ingest_items.IngestItem(image),
    ]


# ----------------------------------------------------------------- work orders
def test_a_work_order_row_with_an_edited_caption_is_refused_by_file_and_line(tmp_path):
    orders = [
        WorkOrder("mj", caption_hash("a red barn"), "a red barn"),
        WorkOrder("mj", caption_hash("=1+1 a formula-like caption"), "=1+1 a formula-like caption"),
    ]
    images = [tmp_path / "barn.png", tmp_path / "formula.png"]
    manifest = _work_order_csv(tmp_path / "todo.csv", orders, images)
    assert [type(item) for item in read_manifest(manifest)] == [ingest_items.IngestItem] * 2

    text = manifest.read_text(encoding="utf-8").replace("a red barn", "a blue barn")
    manifest.write_text(text, encoding="utf-8")
    first, second = read_manifest(manifest)
    assert first == IngestFailure("todo.csv:2", CAPTION_HASH_MISMATCH)
    assert "was the caption edited?" in first.reason
    assert isinstance(second, ingest_items.IngestItem)  # the rest of the batch goes on
    assert second.caption == "=1+1 a formula-like caption"  # the spreadsheet guard came off


def test_an_edited_work_order_row_fails_the_rest_is_ingested_and_its_order_stays_open(
    toy_lab, tmp_path
):
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    captions = ["a red barn in snow", "a lighthouse at dusk"]
    with Lab.open(toy_lab) as lab, lab.session() as session:
        mj = repository.generator_by_name(session, "mj")
        for text in captions:
            repository.ensure_caption(session, caption_hash(text), text)
            repository.add_pending(session, mj.id, caption_hash(text))
    with Lab.open(toy_lab) as lab:
        orders = pending_work(lab, "mj")
    manifest = _work_order_csv(tmp_path / "todo.csv", orders, noise_images(tmp_path / "mj", 2))
    text = manifest.read_text(encoding="utf-8").replace("a red barn", "a blue barn")
    manifest.write_text(text, encoding="utf-8")

    result = rsx(toy_lab, "ingest", str(manifest))
    assert result.exit_code == 1
    assert f"failed: todo.csv:2: {CAPTION_HASH_MISMATCH}" in result.output
    assert "1 added, 0 skipped (already present), 1 failed" in result.output
    with Lab.open(toy_lab) as lab:
        assert [order.caption for order in pending_work(lab, "mj")] == ["a red barn in snow"]
        with lab.session() as session:
            stored = set(session.scalars(select(ResynthesisRow.caption_hash)))
    assert caption_hash("a blue barn in snow") not in stored


# ----------------------------------------------------------------- --seed for plain files
@pytest.mark.slow
def test_seed_makes_a_plain_file_a_runnable_generators_resynthesis(toy_lab, make_toy_image):
    image = make_toy_image("toy-a", "a cat", seed=5)
    args = ["--role", "resynthesis", "--generator", "toy-a", "--caption", "a cat", "--seed", "5"]
    result = rsx(toy_lab, "ingest", str(image), *args)
    assert result.exit_code == 0, result.output
    assert "1 added" in result.output
    with Lab.open(toy_lab) as lab, lab.session() as session:
        rows = session.execute(
            select(ResynthesisRow.seed, ResynthesisRow.caption_hash)
            .join(GeneratorRow, GeneratorRow.id == ResynthesisRow.generator_id)
            .where(GeneratorRow.name == "toy-a")
        ).all()
    assert rows == [(5, caption_hash("a cat"))]


# ----------------------------------------------------------------- Ctrl-C
def test_ctrl_c_says_what_was_kept_and_a_rerun_continues(toy_lab, tmp_path, monkeypatch):
    images = noise_images(tmp_path / "in", 3)
    real_batch = ingest_module._ingest_batch
    interrupt_the_second_batch(monkeypatch)
    result = rsx(toy_lab, "ingest", str(tmp_path / "in"), "--batch-size", "1")
    assert result.exit_code == 130
    assert (
        "interrupted: 1 images stored; rerun the same command to continue: ingest is resumable"
        in result.output
    )
    assert not [t for t in threading.enumerate() if t.name == "rsx-ingest-loader"]
    monkeypatch.setattr(ingest_module, "_ingest_batch", real_batch)

    again = rsx(toy_lab, "ingest", str(tmp_path / "in"), "--batch-size", "1")
    assert again.exit_code == 0, again.output
    assert "2 added, 1 skipped (already present), 0 failed" in again.output
    with Lab.open(toy_lab) as lab, lab.session() as session:
        shas = set(session.scalars(select(ImageRow.sha256)))
    assert {_sha(path) for path in images} <= shas
    assert rsx(toy_lab, "check").exit_code == 0


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
