"""The generator factory: a registered row's settings record to its generator, cache key and K."""

from __future__ import annotations

import json

import pytest

from resynth_index.errors import StoreError
from resynth_index.models.generators import factory
from resynth_index.models.generators.imported import IMPORTED_SETTINGS_HASH, ImportedGenerator
from resynth_index.models.generators.protocol import GenerationSettings


def test_an_imported_generator_has_one_fixed_settings_hash():
    record = factory.settings_record("imported", 3, GenerationSettings(steps=9), "ignored")
    assert json.loads(record) == {"resyntheses": 3}
    assert factory.settings_hash("imported", record) == IMPORTED_SETTINGS_HASH
    model = factory.build_generator("mj", "imported", None, record)
    assert isinstance(model, ImportedGenerator) and not model.can_generate
    assert model.settings.output_hash() == model.settings.cache_hash() == IMPORTED_SETTINGS_HASH
    assert factory.resyntheses_per_caption(record) == 3


def test_a_runnable_generator_record_round_trips():
    settings = GenerationSettings(steps=4, guidance=3.0, width=64, height=64, dtype="float32")
    record = factory.settings_record("toy", 2, settings)
    assert GenerationSettings.from_dict(json.loads(record)["generation"]) == settings
    assert factory.settings_hash("toy", record, "cpu") == settings.cache_hash("cpu")
    assert factory.resyntheses_per_caption(record) == 2
    assert factory.resyntheses_per_caption("{}") == 1
    with pytest.raises(StoreError, match="no model files"):
        factory.build_generator("lost", "toy", None, record)


def test_the_labs_device_fills_a_generator_left_on_auto(toy_lab):
    folder = toy_lab / "models" / "toy-toy-a"
    record = factory.settings_record("toy", 1, GenerationSettings(width=64, height=64))
    on_cpu = factory.build_generator("a", "toy", folder, record, device="cpu")
    assert on_cpu.settings.device == "cpu"
    assert factory.build_generator("a", "toy", folder, record).settings.device == "auto"
    assert on_cpu.fingerprint == factory.build_generator("a", "toy", folder, record).fingerprint
