"""Imported generators: commercial services the lab cannot run, known only by their images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from resynth_index.errors import RsxError
from resynth_index.hashing import hash_json
from resynth_index.models.generators.protocol import GenerationRequest, GenerationSettings

if TYPE_CHECKING:
    import PIL.Image

#: The settings part of every imported resynthesis's cache key: the lab cannot know the settings.
IMPORTED_SETTINGS_HASH = "imported"


class _ImportedSettings(GenerationSettings):
    """Settings of an imported generator: unknown to the lab, so one fixed output hash."""

    def output_hash(self) -> str:
        return IMPORTED_SETTINGS_HASH

    def cache_hash(self, device: str = "auto") -> str:
        return IMPORTED_SETTINGS_HASH


class ImportedGenerator:
    """A candidate whose resyntheses are ingested, never generated (e.g. a closed web service)."""

    can_generate = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.settings: GenerationSettings = _ImportedSettings()
        self.fingerprint = hash_json({"kind": "imported", "name": name})

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        batch_size: int = 8,
        progress: Callable[[int], None] | None = None,
    ) -> list[PIL.Image.Image]:
        raise RsxError(
            f"{self.name} is an imported generator: the lab cannot run it; ingest its images "
            f"with 'rsx ingest --role resynthesis --generator {self.name}' instead"
        )

    def __repr__(self) -> str:
        return f"ImportedGenerator({self.name!r})"
