"""Ingest: files, folders, manifests, the dataset layout; idempotent; bad files fail alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from resynth_index.cli import cli
from resynth_index.lab import Lab
from resynth_index.store.models import (
    EmbeddingRow,
    GeneratorRow,
    ImageRow,
    ReferenceRow,
    ResynthesisRow,
)

pytestmark = pytest.mark.slow  # end to end through the CLI: not in the quick loop


def rsx(lab: Path, *args: str):
    return CliRunner().invoke(cli, ["--lab", str(lab), *args], catch_exceptions=False)


def count(lab: Path, model) -> int:
    with Lab.open(lab) as opened, opened.session() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_folder_ingest_is_idempotent_and_bad_files_fail_alone(toy_lab, make_toy_image, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, name in enumerate(["toy-a", "toy-b", "toy-c"]):
        make_toy_image(name, f"caption {i}").rename(folder / f"good-{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    before = count(toy_lab, ImageRow)

    result = rsx(toy_lab, "ingest", str(folder))
    assert result.exit_code == 1
    assert "3 added, 0 skipped (already present), 1 failed" in result.output
    assert "broken.png" in result.output
    assert count(toy_lab, ImageRow) == before + 3
    assert count(toy_lab, EmbeddingRow) == count(toy_lab, ImageRow)

    again = rsx(toy_lab, "ingest", str(folder / "good-0.png"), str(folder / "good-1.png"))
    assert again.exit_code == 0
    assert "0 added, 2 skipped" in again.output
    assert count(toy_lab, ImageRow) == before + 3
    assert rsx(toy_lab, "check").exit_code == 0


def test_jsonl_manifest_with_references_and_bad_lines(toy_lab, make_toy_image, tmp_path):
    image = make_toy_image("toy-a", "a cat")
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"path": image.name, "role": "reference", "generator": "toy-a", "caption": "a cat"},
        {"path": image.name, "role": "reference", "generator": "ghost"},
        {"path": "missing.png", "role": "query"},
        {"path": image.name, "role": "wizard"},
    ]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    result = rsx(toy_lab, "ingest", str(manifest))
    assert result.exit_code == 1
    assert "1 added, 0 skipped (already present), 4 failed" in result.output
    assert "ghost" in result.output and "missing.png" in result.output
    assert "wizard" in result.output and "m.jsonl:5" in result.output
    assert count(toy_lab, ReferenceRow) == 1


def test_resynthesis_dataset_layout(toy_lab, make_toy_image, tmp_path):
    root = tmp_path / "Dataset" / "100people" / "images"
    makers = ["toy-a", "toy-b"]
    for original_gen in makers:
        (root / original_gen).mkdir(parents=True)
        for n in range(2):
            stem = f"0000{n}"
            caption = f"portrait {n}"
            make_toy_image(original_gen, caption, seed=500 + n).rename(
                root / original_gen / f"{stem}.png"
            )
            for maker in makers:
                target = root / original_gen / "images" / maker
                target.mkdir(parents=True, exist_ok=True)
                make_toy_image(
                    maker, caption, seed=900 + n, name=f"{maker}-{original_gen}-{n}.png"
                ).rename(target / f"{stem}.png")
    (root / "midjourney").mkdir()
    make_toy_image("toy-c", "x", seed=7).rename(root / "midjourney" / "00000.png")

    result = rsx(toy_lab, "ingest", str(tmp_path / "Dataset"), "--layout", "resynthesis-dataset")
    assert result.exit_code == 0, result.output
    assert "registered imported generator midjourney" in result.output
    assert count(toy_lab, ReferenceRow) == 5
    assert count(toy_lab, ResynthesisRow) == 8
    with Lab.open(toy_lab) as lab, lab.session() as session:
        kinds = dict(session.execute(select(GeneratorRow.name, GeneratorRow.kind)).all())
        assert kinds["midjourney"] == "imported"
        # each resynthesis shares its original's caption hash
        refs = session.execute(
            select(ReferenceRow.caption_hash, ImageRow.sha256).join(
                ImageRow, ImageRow.id == ReferenceRow.image_id
            )
        ).all()
        resyntheses = set(session.scalars(select(ResynthesisRow.caption_hash)))
        assert resyntheses <= {h for h, _ in refs}
        assert len(resyntheses) == 4
    again = rsx(toy_lab, "ingest", str(tmp_path / "Dataset"), "--layout", "resynthesis-dataset")
    assert "0 added, 13 skipped" in again.output


# --- a resynthesis slot (generator, caption, settings, seed) holds one image -----------------


def _resyntheses(lab: Path) -> dict[int, str]:
    """seed -> image sha256 of every stored resynthesis."""
    with Lab.open(lab) as opened, opened.session() as session:
        rows = session.execute(
            select(ResynthesisRow.seed, ImageRow.sha256).join(
                ImageRow, ImageRow.id == ResynthesisRow.image_id
            )
        ).all()
    return dict(rows)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _deliveries(make_toy_image, n: int) -> list[Path]:
    """n different images (as an imported service would deliver them)."""
    return [make_toy_image("toy-c", "a cat", seed=2000 + i, name=f"mj-{i}.png") for i in range(n)]


def test_a_second_image_for_the_same_seed_fails_and_is_not_counted_added(
    toy_lab, make_toy_image, tmp_path
):
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    first, second = _deliveries(make_toy_image, 2)
    line = {"role": "resynthesis", "generator": "mj", "caption": "a cat", "seed": 0}
    manifest = _manifest(
        tmp_path / "m.jsonl", [{**line, "path": first.name}, {**line, "path": second.name}]
    )

    result = rsx(toy_lab, "ingest", str(manifest))
    assert result.exit_code == 1
    assert "1 added, 0 skipped (already present), 1 failed" in result.output
    [failure] = [x for x in result.output.splitlines() if x.startswith("failed:")]
    assert second.name in failure and "seed 0" in failure and "'mj'" in failure
    assert _resyntheses(toy_lab) == {0: _sha(first)}
    assert rsx(toy_lab, "check").exit_code == 0  # the refused image left the store whole

    again = rsx(toy_lab, "ingest", str(manifest))  # refused again, now before its blob is written
    assert again.exit_code == 1
    assert "0 added, 1 skipped (already present), 1 failed" in again.output
    assert _resyntheses(toy_lab) == {0: _sha(first)}


def test_a_delivery_conflicting_with_a_stored_one_is_refused_before_its_blob(
    toy_lab, make_toy_image, tmp_path
):
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    first, second = _deliveries(make_toy_image, 2)
    args = ["--role", "resynthesis", "--generator", "mj", "--caption", "a cat"]
    line = {"role": "resynthesis", "generator": "mj", "caption": "a cat", "seed": 3}
    stored = _manifest(tmp_path / "a.jsonl", [{**line, "path": first.name}])
    assert rsx(toy_lab, "ingest", str(stored)).exit_code == 0
    images_before = count(toy_lab, ImageRow)

    conflicting = _manifest(tmp_path / "b.jsonl", [{**line, "path": second.name}])
    result = rsx(toy_lab, "ingest", str(conflicting))
    assert result.exit_code == 1
    assert "0 added, 0 skipped (already present), 1 failed" in result.output
    assert "seed 3" in result.output
    assert _resyntheses(toy_lab) == {3: _sha(first)}
    assert count(toy_lab, ImageRow) == images_before
    with Lab.open(toy_lab) as lab:
        assert not lab.blobs.exists(_sha(second))
    assert rsx(toy_lab, "check").exit_code == 0

    # without a seed, the same image takes the caption's next free seed
    assert rsx(toy_lab, "ingest", str(second), *args).exit_code == 0
    assert _resyntheses(toy_lab) == {3: _sha(first), 4: _sha(second)}


def test_deliveries_without_seed_take_the_next_free_seeds(toy_lab, make_toy_image):
    assert rsx(toy_lab, "generator", "add", "mj", "--imported").exit_code == 0
    images = _deliveries(make_toy_image, 3)
    args = ["--role", "resynthesis", "--generator", "mj", "--caption", "a cat"]
    result = rsx(toy_lab, "ingest", *map(str, images[:2]), *args)
    assert result.exit_code == 0 and "2 added, 0 skipped" in result.output
    again = rsx(toy_lab, "ingest", *map(str, images), *args)  # the first two are there already
    assert again.exit_code == 0 and "1 added, 2 skipped" in again.output
    assert _resyntheses(toy_lab) == {i: _sha(image) for i, image in enumerate(images)}
