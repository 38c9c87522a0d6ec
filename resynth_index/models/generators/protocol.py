"""The generator protocol: generation settings, requests, and what every candidate generator offers.

A resynthesis is keyed by (generator, caption, settings, seed). The settings part is
``GenerationSettings.cache_hash(device)``: the settings that change pixels, with ``dtype`` resolved
for the device the generator runs on ("auto" is float16 on CUDA and float32 elsewhere, and those
draw different pictures). ``output_hash`` hashes the settings as registered (dtype as written); it
is part of the generator's ``fingerprint``, which must not depend on the machine a lab opens on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from resynth_index.errors import RsxError
from resynth_index.models.fingerprints import hash_json

if TYPE_CHECKING:
    import PIL.Image

DTYPES = ("auto", "float32", "float16", "bfloat16")

#: Settings that do not change the pixels a generator makes (left out of ``output_hash``).
_NOT_OUTPUT = frozenset({"device"})

#: How float32 is spelt inside ``cache_hash``. Before dtype was resolved, keys hashed the literal
#: "auto", which meant float32 on every machine without CUDA; spelling float32 that way keeps the
#: keys of resyntheses a CPU lab stored then (explicit float16 and bfloat16 keys are unchanged too).
_FLOAT32_KEY = "auto"


def concrete_dtype(dtype: str, device: str) -> str:
    """The dtype a generator really runs in: "auto" is float16 on CUDA, float32 elsewhere.

    ``device`` is a concrete torch device name ("cpu", "cuda", "cuda:1", "mps").
    """
    if dtype not in DTYPES:
        raise RsxError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    return "float16" if device.startswith("cuda") else "float32"


@lru_cache(maxsize=1)
def _auto_device() -> str:
    """The device "auto" picks on this machine (resolved once per process)."""
    from resynth_index.models.devices import resolve_device

    return resolve_device("auto")


@dataclass(frozen=True)
class GenerationSettings:
    """How a generator is run. Everything but ``device`` can change the generated pixels.

    ``scheduler`` None keeps the pipeline's own scheduler, else names a diffusers scheduler class
    (e.g. "DDIMScheduler"). ``dtype`` "auto" means float16 on CUDA and float32 elsewhere, so the
    pixels of "auto" depend on the device: cache keys use ``cache_hash(device)``.
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
        """Digest of the settings as registered, all but ``device`` (``dtype`` as written).

        Part of a generator's fingerprint: it names the registration and is the same on every
        machine. It is NOT the resynthesis cache key: "auto" draws different pictures on
        different devices; see ``cache_hash``.
        """
        return hash_json({k: v for k, v in self.to_dict().items() if k not in _NOT_OUTPUT})

    def run_device(self, fallback: str = "auto") -> str:
        """The device choice this generator runs on: its own ``device``, else ``fallback``.

        ``fallback`` is the lab's device choice; the result may still be "auto".
        """
        return self.device if self.device != "auto" else fallback

    def resolved_dtype(self, device: str = "auto") -> str:
        """The concrete dtype when run on ``device`` (a device choice; "auto" is resolved here).

        A device named explicitly is taken as given (no availability check: that is the
        loader's job), so looking stored resyntheses up never needs the device itself.
        """
        if self.dtype != "auto":
            return self.dtype
        return concrete_dtype(self.dtype, _auto_device() if device == "auto" else device)

    def resolved(self, device: str = "auto") -> GenerationSettings:
        """A copy with ``dtype`` made concrete for ``device``."""
        return replace(self, dtype=self.resolved_dtype(device))

    def cache_hash(self, device: str = "auto") -> str:
        """The settings part of the resynthesis cache key when run on ``device``.

        Every field that changes the pixels (all but ``device``), with ``dtype`` resolved: the
        same settings on a CPU (float32) and on CUDA (float16 under "auto") give different keys,
        and "auto" on a CPU equals explicit float32. float32 is spelt ``"auto"`` in the hashed
        record, so keys stored before dtype was resolved keep meaning float32.
        """
        dtype = self.resolved_dtype(device)
        record = {k: v for k, v in self.to_dict().items() if k not in _NOT_OUTPUT}
        record["dtype"] = _FLOAT32_KEY if dtype == "float32" else dtype
        return hash_json(record)


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
