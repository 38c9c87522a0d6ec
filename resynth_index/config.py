"""Where a lab lives and what its settings file holds.

A lab is a directory::

    settings.json   this file's LabSettings (embedder, scoring, limits)
    lab.sqlite      the store (source of truth)
    blobs/          content-addressed copies of every image seen
    index/          FAISS index files derived from the store (rebuildable)
    models/         models the lab materialised itself (the toy zoo)

Its location comes from ``--lab PATH``, else ``$RSX_LAB``, else a per-user data directory.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from resynth_index.errors import StoreError

LAB_ENV = "RSX_LAB"
SETTINGS_FILE = "settings.json"
DATABASE_FILE = "lab.sqlite"
SETTINGS_VERSION = 1

DISTANCES = ("cosine", "euclidean")
AGGREGATIONS = ("min", "mean")
#: Concrete embedder precisions (models.embedders.PRECISIONS less "auto", which is resolved at
#: ``rsx init``); "" in a settings file means "not recorded": a lab made before it was.
EMBEDDER_PRECISIONS = ("fp32", "fp16", "bf16")


def default_lab_dir() -> Path:
    """The per-user default lab directory, following each platform's convention for app data."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "rsx" / "lab"


def resolve_lab_dir(flag: str | os.PathLike[str] | None) -> Path:
    """``--lab`` wins, then ``$RSX_LAB``, then the per-user default."""
    if flag:
        return Path(flag).expanduser()
    if os.environ.get(LAB_ENV):
        return Path(os.environ[LAB_ENV]).expanduser()
    return default_lab_dir()


@dataclass
class LabSettings:
    """The lab's settings. The embedder is fixed when the lab is created."""

    embedder: dict[str, Any] = field(default_factory=dict)  # EmbedderSpec.to_dict()
    embedder_label: str = ""  # how the user named it at init ("toy", an arch + file, ...)
    embedder_fingerprint: str = ""
    embedder_dim: int = 0
    # the precision the embedder was created with, resolved once at init (fp16 on CUDA under
    # "auto") and used wherever the lab opens: it is part of the fingerprint. Older labs: "".
    embedder_precision: str = ""
    device: str = "auto"
    distance: str = "cosine"
    aggregation: str = "min"
    temperature: float = 0.05  # softmax over negative distances
    # the verdict is 'unknown' when the best distance exceeds this threshold
    unknown_threshold: float | None = None
    default_resyntheses: int = 1
    generation_batch_size: int = 8
    embedding_batch_size: int = 32
    max_pixels: int = 64_000_000
    captioner: str | None = None  # a local transformers image-to-text folder
    version: int = SETTINGS_VERSION

    def validate(self) -> None:
        """Refuse settings no lab can run with (StoreError, one line)."""
        if self.embedder_precision and self.embedder_precision not in EMBEDDER_PRECISIONS:
            raise StoreError(
                f"embedder_precision must be one of {', '.join(EMBEDDER_PRECISIONS)}, "
                f"not {self.embedder_precision!r}"
            )
        if self.distance not in DISTANCES:
            choices = ", ".join(DISTANCES)
            raise StoreError(f"distance must be one of {choices}, not {self.distance!r}")
        if self.aggregation not in AGGREGATIONS:
            raise StoreError(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {self.aggregation!r}"
            )
        if self.temperature <= 0:
            raise StoreError("temperature must be positive")
        if self.default_resyntheses < 1:
            raise StoreError("default_resyntheses must be at least 1")

    @classmethod
    def load(cls, lab_dir: Path) -> LabSettings:
        path = lab_dir / SETTINGS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(
                f"{lab_dir} is not an rsx lab (no {SETTINGS_FILE}); run 'rsx init'"
            ) from None
        except (OSError, ValueError) as error:
            raise StoreError(f"cannot read {path}: {error}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise StoreError(f"{path} has unknown settings: {', '.join(unknown)}")
        settings = cls(**raw)
        settings.validate()
        return settings

    def save(self, lab_dir: Path) -> None:
        """Write atomically: a crash leaves the old file or the new one, never half of one."""
        self.validate()
        path = lab_dir / SETTINGS_FILE
        temp = path.with_name(f".{SETTINGS_FILE}.tmp-{os.getpid()}")
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
