"""The generator protocol: generation settings, requests, and what every candidate generator offers.

A resynthesis is keyed by (generator weights, output-affecting settings, caption, seed); the
settings' ``output_hash`` and the generator's ``fingerprint`` are what make that key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from resynth_index.errors import RsxError
from resynth_index.models.fingerprints import hash_json

if TYPE_CHECKING:
    import PIL.Image

DTYPES = ("auto", "float32", "float16", "bfloat16")

#: Settings that do not change the pixels a generator makes (left out of ``output_hash``).
_NOT_OUTPUT = frozenset({"device"})


@dataclass(frozen=True)
class GenerationSettings:
    """How a generator is run. Everything but ``device`` can change the generated pixels.

    ``scheduler`` None keeps the pipeline's own scheduler, else names a diffusers scheduler class
    (e.g. "DDIMScheduler"). ``dtype`` "auto" means float16 on CUDA and float32 elsewhere.
    """

    steps: int = 25
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    scheduler: str | None = None
    negative_prompt: str | None = None
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise RsxError(f"generation steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.guidance, (int, float)) or isinstance(self.guidance, bool):
            raise RsxError(f"guidance must be a number, got {self.guidance!r}")
        for side in ("width", "height"):
            value = getattr(self, side)
            if not isinstance(value, int) or isinstance(value, bool) or value < 8 or value % 8:
                raise RsxError(f"{side} must be a positive multiple of 8, got {value!r}")
        if self.dtype not in DTYPES:
            raise RsxError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        # guidance 7 and 7.0 are the same setting: normalise so the hash agrees
        object.__setattr__(self, "guidance", float(self.guidance))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        """Settings from a dict; unknown keys are refused (a typo must not pass silently)."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RsxError(
                f"unknown generation setting(s) {', '.join(unknown)}: "
                f"known are {', '.join(sorted(known))}"
            )
        return cls(**data)

    def output_hash(self) -> str:
        """Digest of the settings that change the picture (all but ``device``).

        dtype is included: float16 changes pixels. This is the settings part of the resynthesis
        cache key.
        """
        return hash_json({k: v for k, v in self.to_dict().items() if k not in _NOT_OUTPUT})


@dataclass(frozen=True)
class GenerationRequest:
    """One image to make: its prompt and its seed."""

    caption: str
    seed: int


@runtime_checkable
class Generator(Protocol):
    """A candidate generator.

    ``fingerprint`` covers weights and output-affecting settings; it changes iff either changes.
    ``generate`` returns images in request order, made in batches of ``batch_size``; each image
    depends only on (weights, settings, caption, seed), never on the batch it was made in.
    ``progress(n)`` is called after each batch with the number of images just made.
    """

    name: str
    fingerprint: str
    settings: GenerationSettings
    can_generate: bool

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        batch_size: int = 8,
        progress: Callable[[int], None] | None = None,
    ) -> list[PIL.Image.Image]: ...
