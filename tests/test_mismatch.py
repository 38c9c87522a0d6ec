"""Model mismatch: a lab never compares vectors from different embedders.

The embedder's fingerprint (weights, architecture, layer, preprocessing) is fixed in
settings.json when the lab is made. Loading anything else refuses with one line, before a single
image is stored; an index file whose header names another embedder is never searched: it is
reported by ``rsx check`` and rebuilt from this embedder's rows in the database.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hostile_files import good_images, index_problems, rsx, store_state, with_imported_resynthesis

from resynth_index.config import LabSettings
from resynth_index.lab import Lab
from resynth_index.store.vectors import VectorIndex, _read_header

pytestmark = pytest.mark.slow  # end to end through the CLI: not in the quick loop

CAPTION = "an empty street after rain"


def replace_weights(lab: Path) -> None:
    """The lab's toy-clip folder now holds the toy model of another seed."""
    from resynth_index.models.toyzoo.clip import save_toy_clip

    save_toy_clip(lab / "models" / "toy-clip", seed=1)


def point_elsewhere(lab: Path) -> None:
    """settings.json names another model folder (same architecture, other weights)."""
    from resynth_index.models.toyzoo.clip import save_toy_clip

    save_toy_clip(lab / "models" / "other-clip", seed=2)
    settings = LabSettings.load(lab)
    settings.embedder = {**settings.embedder, "weights": "local-dir:models/other-clip"}
    settings.save(lab)


def other_layer(lab: Path) -> None:
    """Same weights, but another block's class token: other vectors, another fingerprint."""
    settings = LabSettings.load(lab)
    settings.embedder = {**settings.embedder, "layer": 1}
    settings.save(lab)


@pytest.mark.parametrize("swap", [replace_weights, point_elsewhere, other_layer])
def test_another_embedder_is_refused_in_one_line(toy_lab, tmp_path, swap):
    with_imported_resynthesis(toy_lab, tmp_path / "imp", CAPTION)
    swap(toy_lab)
    before = store_state(toy_lab)
    [suspect] = good_images(tmp_path / "q", 1, seed=51)

    for args in (
        ["query", str(suspect), "--caption", CAPTION, "--candidates", "imp", "--no-generate"],
        ["ingest", str(suspect)],
    ):
        result = rsx(toy_lab, *args)
        assert result.exit_code == 1
        assert result.stdout == ""
        [line] = result.stderr.splitlines()
        assert "embedder" in line and "not the one this lab was built with" in line, line
    after = store_state(toy_lab)
    assert after.embeddings == before.embeddings and after.queries == before.queries


def test_an_index_file_from_another_embedder_is_never_searched(toy_lab, tmp_path):
    with_imported_resynthesis(toy_lab, tmp_path / "imp", CAPTION)
    [suspect] = good_images(tmp_path / "q", 1, seed=52)
    args = ["query", str(suspect), "--caption", CAPTION, "--candidates", "imp", "--no-generate"]
    first = rsx(toy_lab, *args, "--json")
    assert first.exit_code == 0, first.output
    with Lab.open(toy_lab) as lab:
        path, dim, ours = lab.index_path, lab.settings.embedder_dim, lab.fingerprint
    ids = np.arange(1, 3, dtype=np.int64)  # the same ids, other vectors, another fingerprint
    foreign = VectorIndex(path, "e" * 64, dim)
    foreign.add(ids, np.eye(2, dim, dtype=np.float32))
    path.unlink()
    foreign.save()
    assert _read_header(path)["fingerprint"] == "e" * 64

    check = rsx(toy_lab, "check")
    assert check.exit_code == 1
    [line] = [line for line in check.output.splitlines() if line.startswith("problem:")]
    assert f"index was built by embedder {'e' * 12}, the lab uses {ours[:12]}" in line
    again = rsx(toy_lab, *args, "--json")  # its vectors come from this embedder's rows
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["ranking"] == json.loads(first.stdout)["ranking"]
    assert _read_header(path)["fingerprint"] == "e" * 64  # a query never writes the index
    assert rsx(toy_lab, "index", "sync").exit_code == 0
    assert _read_header(path)["fingerprint"] == ours  # rebuilt from this embedder's rows
    assert index_problems(toy_lab) == []
