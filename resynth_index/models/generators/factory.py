"""From what a lab stores about a generator to the generator itself, and back.

A registered generator is a row: a name, a kind (``diffusers``, ``toy`` or ``imported``), a source
(the pipeline folder or checkpoint; none for an imported one) and a settings record, the JSON text
``{"resyntheses": K, "generation": {...}, "config": PATH}`` made by ``settings_record``. This
module is the one place that reads that record: the generator it describes (``build_generator``),
the settings part of its resyntheses' cache key (``settings_hash``), how many resyntheses of
a caption it is asked for (``resyntheses_per_caption``), a short summary for listings
(``settings_summary``) and a revision of the settings (``revised_settings_record``,
``with_settings_change``). It takes plain values, not the lab.

Changing a registered generator's settings (``rsx generator set``) writes a new record whose
``settings_history`` list keeps every earlier change: ``{"at": ISO time, "from": {...}, "to":
{...}}``, each side holding ``resyntheses``, ``generation`` (none for an imported generator) and
the ``fingerprint`` of the generator under those settings. Resyntheses stay keyed by the settings
hash they were made under, so the history says which settings made an old one; the history is
never part of a cache key or a fingerprint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from resynth_index.errors import RsxError, StoreError
from resynth_index.hashing import FileDigests
from resynth_index.models.generators.imported import IMPORTED_SETTINGS_HASH
from resynth_index.models.generators.protocol import GenerationSettings, Generator

GENERATOR_KINDS = ("diffusers", "toy", "imported")

#: The generation settings ``rsx generator set`` may change (``device`` is the lab's business).
TUNABLE_SETTINGS = ("steps", "guidance", "width", "height", "scheduler", "negative_prompt", "dtype")
#: The record's key for the list of earlier settings changes.
HISTORY_KEY = "settings_history"


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
    *,
    digests: FileDigests | None = None,
) -> Generator:
    """The generator a row describes (nothing is loaded until it generates).

    ``source`` is the absolute pipeline folder or checkpoint (None for an imported generator).
    ``device``, the lab's device choice, is used when the settings leave the device to "auto".
    ``digests`` gives the SHA-256 of its files for the fingerprint (the lab's memory of digests,
    so an unchanged checkpoint is not read again; default: read every file).
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
    return DiffusersGenerator(name, source, settings, config=record.get("config"), digests=digests)


def settings_hash(kind: str, settings_json: str, device: str = "auto") -> str:
    """The settings part of the cache key (generator, caption, settings, seed) of its resyntheses
    when run with the lab's device choice ``device`` (see ``GenerationSettings.cache_hash``).

    An imported generator's settings are unknown to the lab: one fixed value stands for them.
    """
    if kind == "imported":
        return IMPORTED_SETTINGS_HASH
    settings = GenerationSettings.from_dict(json.loads(settings_json)["generation"])
    return settings.cache_hash(settings.run_device(device))


def generation_settings(kind: str, settings_json: str) -> GenerationSettings | None:
    """The generation settings a registered generator runs with; None for an imported one
    (its settings are the service's, unknown to the lab)."""
    if kind == "imported":
        return None
    return GenerationSettings.from_dict(json.loads(settings_json)["generation"])


def resyntheses_per_caption(settings_json: str) -> int:
    """How many resyntheses of a caption the generator is asked for (K) when none is given."""
    return int(json.loads(settings_json).get("resyntheses", 1))


def settings_summary(kind: str, settings_json: str) -> dict[str, Any]:
    """What a listing shows of a generator's settings: steps, guidance, width, height (None for
    an imported generator, whose settings the lab cannot know) and resyntheses per caption."""
    record = json.loads(settings_json)
    generation = record.get("generation") if kind != "imported" else None
    summary: dict[str, Any] = {"resyntheses": int(record.get("resyntheses", 1))}
    for key in ("steps", "guidance", "width", "height"):
        summary[key] = generation.get(key) if generation else None
    return summary


def revised_settings_record(
    kind: str,
    settings_json: str,
    *,
    changes: dict[str, Any] | None = None,
    resyntheses: int | None = None,
) -> str | None:
    """The settings record with ``changes`` (generation settings, see ``TUNABLE_SETTINGS``; a
    None value in ``scheduler`` or ``negative_prompt`` clears it) and ``resyntheses`` applied,
    validated; None when nothing would change. The history is carried over unchanged (see
    ``with_settings_change``). Raises RsxError, writing nothing, for a value refused.
    """
    changes = dict(changes or {})
    unknown = sorted(set(changes) - set(TUNABLE_SETTINGS))
    if unknown:
        raise RsxError(
            f"cannot set {', '.join(unknown)}: settable are {', '.join(TUNABLE_SETTINGS)}"
        )
    if kind == "imported" and changes:
        raise RsxError(
            "an imported generator has no generation settings the lab could change; "
            "only --resyntheses applies to it"
        )
    if resyntheses is not None and (isinstance(resyntheses, bool) or resyntheses < 1):
        raise RsxError(f"--resyntheses must be at least 1, not {resyntheses!r}")
    guidance = changes.get("guidance")
    if isinstance(guidance, float) and not math.isfinite(guidance):
        raise RsxError(f"guidance must be a finite number, got {guidance!r}")
    record = json.loads(settings_json)
    revised = dict(record)
    if resyntheses is not None:
        revised["resyntheses"] = resyntheses
    if changes:
        merged = {**record["generation"], **changes}
        revised["generation"] = GenerationSettings.from_dict(merged).to_dict()  # validates
    if revised == record:
        return None
    return json.dumps(revised, sort_keys=True)


def with_settings_change(
    old_json: str,
    new_json: str,
    *,
    old_fingerprint: str,
    new_fingerprint: str,
    at: str,
) -> str:
    """``new_json`` with the change from ``old_json`` appended to its ``settings_history``:
    when (``at``, an ISO time), and both sides' resyntheses, generation settings, fingerprint."""

    def side(record: dict[str, Any], fingerprint: str) -> dict[str, Any]:
        kept: dict[str, Any] = {k: record[k] for k in ("resyntheses", "generation") if k in record}
        kept["fingerprint"] = fingerprint
        return kept

    old, new = json.loads(old_json), json.loads(new_json)
    history = list(old.get(HISTORY_KEY, []))
    history.append({"at": at, "from": side(old, old_fingerprint), "to": side(new, new_fingerprint)})
    new[HISTORY_KEY] = history
    return json.dumps(new, sort_keys=True)


def settings_history(settings_json: str) -> list[dict[str, Any]]:
    """The earlier settings changes recorded for a generator, oldest first (may be empty)."""
    return list(json.loads(settings_json).get(HISTORY_KEY, []))
