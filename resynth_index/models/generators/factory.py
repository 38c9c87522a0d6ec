"""From what a lab stores about a generator to the generator itself, and back.

A registered generator is a row: a name, a kind (``diffusers``, ``toy`` or ``imported``), a source
(the pipeline folder or checkpoint; none for an imported one) and a settings record, the JSON text
``{"resyntheses": K, "generation": {...}, "config": PATH}`` made by ``settings_record``. This
module is the one place that reads that record: the generator it describes (``build_generator``),
the settings part of its resyntheses' cache key (``settings_hash``) and how many resyntheses of
a caption it is asked for (``resyntheses_per_caption``). It takes plain values, not the lab.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resynth_index.errors import StoreError
from resynth_index.models.generators.imported import IMPORTED_SETTINGS_HASH
from resynth_index.models.generators.protocol import GenerationSettings, Generator

GENERATOR_KINDS = ("diffusers", "toy", "imported")


def settings_record(
    kind: str,
    resyntheses: int,
    settings: GenerationSettings | None = None,
    config: str | Path | None = None,
) -> str:
    """The settings record of a generator about to be registered (JSON text, sorted keys).

    An imported generator keeps only ``resyntheses``; a runnable one its generation settings
    (the defaults when None) and, when given, the absolute path of its diffusers config.
    """
    record: dict[str, Any] = {"resyntheses": resyntheses}
    if kind != "imported":
        record["generation"] = (settings or GenerationSettings()).to_dict()
        if config is not None:
            record["config"] = str(Path(config).resolve())
    return json.dumps(record, sort_keys=True)


def build_generator(
    name: str,
    kind: str,
    source: Path | None,
    settings_json: str,
    device: str | None = None,
) -> Generator:
    """The generator a row describes (nothing is loaded until it generates).

    ``source`` is the absolute pipeline folder or checkpoint (None for an imported generator).
    ``device``, the lab's device choice, is used when the settings leave the device to "auto".
    """
    if kind == "imported":
        from resynth_index.models.generators.imported import ImportedGenerator

        return ImportedGenerator(name)
    from resynth_index.models.generators.diffusers import DiffusersGenerator

    if source is None:
        raise StoreError(f"generator {name!r} has no model files")
    record = json.loads(settings_json)
    settings = GenerationSettings.from_dict(record["generation"])
    if device is not None and device != "auto" and settings.device == "auto":
        settings = GenerationSettings.from_dict({**settings.to_dict(), "device": device})
    return DiffusersGenerator(name, source, settings, config=record.get("config"))


def settings_hash(kind: str, settings_json: str, device: str = "auto") -> str:
    """The settings part of the cache key (generator, caption, settings, seed) of its resyntheses
    when run with the lab's device choice ``device`` (see ``GenerationSettings.cache_hash``).

    An imported generator's settings are unknown to the lab: one fixed value stands for them.
    """
    if kind == "imported":
        return IMPORTED_SETTINGS_HASH
    settings = GenerationSettings.from_dict(json.loads(settings_json)["generation"])
    return settings.cache_hash(settings.run_device(device))


def resyntheses_per_caption(settings_json: str) -> int:
    """How many resyntheses of a caption the generator is asked for (K) when none is given."""
    return int(json.loads(settings_json).get("resyntheses", 1))
