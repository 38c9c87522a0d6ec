"""The Lab facade: handles it keeps (an embedder adopted, not loaded twice) and its refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from resynth_index.errors import StoreError
from resynth_index.lab import Lab


def test_open_adopts_a_loaded_embedder_and_refuses_a_foreign_one(toy_lab):
    with Lab.open(toy_lab) as lab:
        model = lab.embedder
    with Lab.open(toy_lab, embedder=model) as again:
        assert again.embedder is model  # shared, not loaded a second time
    foreign = SimpleNamespace(fingerprint="0" * 64, dim=model.dim)
    with pytest.raises(StoreError, match="not the one this lab was built with"):
        Lab.open(toy_lab, embedder=foreign)


def test_create_with_an_embedder_already_loaded(toy_lab, tmp_path):
    from resynth_index.models.embedders import EmbedderSpec

    with Lab.open(toy_lab) as lab:
        model = lab.embedder
        folder = toy_lab / "models" / "toy-clip"
    spec = EmbedderSpec(arch="", weights=f"local-dir:{folder}")
    with Lab.create_with_embedder(tmp_path / "new", spec, model, device="cpu") as made:
        assert made.embedder is model and made.fingerprint == model.fingerprint
        assert made.generators() == []
    with Lab.open(tmp_path / "new") as reopened:
        assert reopened.embedder.fingerprint == model.fingerprint
    with pytest.raises(StoreError, match="already an rsx lab"):
        Lab.create_with_embedder(tmp_path / "new", spec, model)
