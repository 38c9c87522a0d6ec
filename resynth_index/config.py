"""Where a lab lives and what its settings file holds.

A lab is a directory::

    settings.json   this file's LabSettings (embedder, scoring, limits)
    lab.sqlite      the store (source of truth), unless settings name a PostgreSQL database
    blobs/          content-addressed copies of every image seen (or the path settings name)
    index/          FAISS index files derived from the store (rebuildable)
    quarantine/     blobs no row pointed at, moved aside by 'rsx check --repair'
    models/         models the lab materialised itself (the toy zoo)

Its location comes from ``--lab PATH``, else ``$RSX_LAB``, else a per-user data directory.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from resynth_index.errors import StoreError

LAB_ENV = "RSX_LAB"
SETTINGS_FILE = "settings.json"
DATABASE_FILE = "lab.sqlite"
QUARANTINE_DIR = "quarantine"  # orphan blobs a repair moved aside (never deleted unless asked)
#: 2: generation_batch_size may be "auto" (the default). A version-1 file holding 8, the old
#: default, with no recorded change of it, loads as "auto" (see ``LabSettings.load``).
SETTINGS_VERSION = 2
#: The generation batch size every lab had by default before "auto" (settings version 1).
OLD_DEFAULT_GENERATION_BATCH = 8
#: ``generation_batch_size`` "auto": chosen per generator where it runs (CUDA: by image size and
#: free memory; a CPU: a few), see ``models.generators.batching``.
AUTO_BATCH = "auto"

DISTANCES = ("cosine", "euclidean")
AGGREGATIONS = ("min", "mean")
#: Concrete embedder precisions (models.embedders.PRECISIONS less "auto", which is resolved at
#: ``rsx init``); "" in a settings file means "not recorded": a lab made before it was.
EMBEDDER_PRECISIONS = ("fp32", "fp16", "bf16")

#: The default margin floor: an answer whose best two candidates lie closer than this (in the
#: lab's distance) is 'inconclusive' rather than the best one's name. Measured on the toy
#: benchmark (scripts/toy_benchmark.py: 6 toy generators, two families of two near-identical
#: ones, 150 references, cosine distance, min over 1 resynthesis): every margin bin under 0.002
#: was right no more often than a coin flip between the top two (0-0.2 ms: 6 answers, 17 %;
#: 0.2-0.5 ms: 14, 43 %; 0.5-1 ms: 25, 48 %; 1-2 ms: 36, 53 %; all 81 under 0.002: 47 %), while
#: 2-5 ms was right 79 % of the time and every margin over 0.005 100 %. The floor makes 54 % of
#: those toy answers inconclusive (the family members) and the rest 94 % right. It is in units
#: of the toy embedder's distances: measure a real embedder's margins and set it with
#: 'rsx config set margin_floor'.
DEFAULT_MARGIN_FLOOR = 0.002


def default_lab_dir() -> Path:
    """The per-user default lab directory, following each platform's convention for app data."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "rsx" / "lab"


def demo_lab_dir() -> Path:
    """Where ``rsx demo`` keeps its toy lab without ``--lab``: beside the per-user default lab
    (never in ``$RSX_LAB``, which may be a real lab)."""
    return default_lab_dir().with_name("demo-lab")


def demo_lab_hint(lab_dir: Path) -> str | None:
    """What "no lab at LAB_DIR" can add once the demo has run: how to query the demo's lab
    (``rsx --lab DEMO query ...``). None when the demo's lab does not exist, or is ``lab_dir``."""
    demo = demo_lab_dir()
    if not (demo / SETTINGS_FILE).is_file() or Path(lab_dir).expanduser() == demo:
        return None
    return f"or use the demo's lab: rsx --lab {shlex.quote(str(demo))} query ..."


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
    # the verdict is 'inconclusive' when the second-best lies within this of the best
    margin_floor: float = DEFAULT_MARGIN_FLOOR
    default_candidates: list[str] | None = None  # None: every active generator
    default_resyntheses: int = 1
    # images per generation batch: a whole number, or "auto" (chosen for the device, per generator)
    generation_batch_size: int | str = AUTO_BATCH
    embedding_batch_size: int = 32
    max_pixels: int = 64_000_000
    captioner: str | None = None  # a local transformers image-to-text folder
    # the store: "" is the lab's own SQLite file; else a PostgreSQL URL without a password
    # ('rsx init --database'), which several machines may share
    database_url: str = ""
    # the blob path: "" is <lab>/blobs; else a folder ('rsx init --blobs'; relative: to the lab)
    blobs: str = ""
    version: int = SETTINGS_VERSION
    # every change made after creation ('rsx config set'): {"at", "key", "old", "new"}
    changes: list[dict[str, Any]] = field(default_factory=list)

    def validate(self) -> None:
        """Refuse settings no lab can run with (StoreError, one line)."""
        if not isinstance(self.embedder, dict) or not isinstance(self.embedder_fingerprint, str):
            raise StoreError("embedder must be an object and embedder_fingerprint text")
        dim = self.embedder_dim
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise StoreError("embedder_dim must be a whole number")
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
        threshold = self.unknown_threshold
        if threshold is not None and not (_real(threshold) and math.isfinite(threshold)):
            raise StoreError("the threshold must be a finite number, or none")
        if not _non_negative(self.margin_floor):
            raise StoreError("margin_floor must be a number at least 0")
        if self.generation_batch_size != AUTO_BATCH:
            value = self.generation_batch_size
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StoreError("generation_batch_size must be a whole number at least 1, or auto")
        for name in ("embedding_batch_size", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StoreError(f"{name} must be a whole number at least 1")
        if self.default_candidates is not None and (
            not isinstance(self.default_candidates, list)
            or not self.default_candidates
            or not all(isinstance(n, str) and n for n in self.default_candidates)
        ):
            raise StoreError("default_candidates must be a list of generator names, or none")
        if not isinstance(self.changes, list):
            raise StoreError("changes must be a list")
        for name in ("database_url", "blobs"):
            if not isinstance(getattr(self, name), str):
                raise StoreError(f"{name} must be text")

    def change(self, key: str, value: Any, *, at: datetime | None = None) -> dict[str, Any] | None:
        """Set one changeable setting (``key`` as ``rsx config`` names it; ``value`` already
        parsed) and record the change in ``changes``. Validated first: a refused value leaves
        the settings as they were. Returns the change recorded ({"at", "key", "old", "new"}),
        or None when ``value`` is already the setting (nothing to record).
        """
        if key not in CHANGEABLE:
            raise StoreError(f"{key!r} cannot be changed; changeable: {', '.join(CHANGEABLE)}")
        name = CHANGEABLE[key]
        old = getattr(self, name)
        if old == value:
            return None
        setattr(self, name, value)
        try:
            self.validate()
        except StoreError:
            setattr(self, name, old)
            raise
        record = {
            "at": (at or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
            "key": key,
            "old": old,
            "new": value,
        }
        self.changes.append(record)
        return record

    def get(self, key: str) -> Any:
        """The value of one changeable setting, by the name ``rsx config`` gives it."""
        if key not in CHANGEABLE:
            raise StoreError(f"unknown setting {key!r}; settings: {', '.join(CHANGEABLE)}")
        return getattr(self, CHANGEABLE[key])

    @classmethod
    def load(cls, lab_dir: Path) -> LabSettings:
        """The settings of the lab at ``lab_dir``; a file written before a setting existed
        loads with that setting's default (unknown keys are refused: a typo must show)."""
        path = lab_dir / SETTINGS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(
                f"{lab_dir} is not an rsx lab (no {SETTINGS_FILE}); run 'rsx init'"
            ) from None
        except (OSError, ValueError) as error:
            raise StoreError(f"cannot read {path}: {error}") from None
        if not isinstance(raw, dict):
            raise StoreError(f"cannot read {path}: not a JSON object{_RESTORE_SETTINGS}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in set(raw) - known)
        if unknown:
            raise StoreError(f"{path} has unknown settings: {', '.join(unknown)}")
        _check_version(path, raw.get("version", 1))
        missing = [key for key in REQUIRED_SETTINGS if not raw.get(key)]
        if missing:
            raise StoreError(
                f"{path} lacks {', '.join(missing)}: it does not describe a lab{_RESTORE_SETTINGS}"
            )
        raw = _upgraded(raw)
        try:
            settings = cls(**raw)
            settings.validate()
        except (TypeError, ValueError) as error:  # a value of the wrong type
            raise StoreError(f"cannot read {path}: {error}") from None
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


#: What every lab's settings file names, set by ``rsx init``: without them no lab can open (a
#: file reduced to ``{}`` would otherwise load as a lab with no embedder).
REQUIRED_SETTINGS = ("embedder", "embedder_fingerprint", "embedder_dim")
_RESTORE_SETTINGS = " (restore settings.json from a backup; the database and blobs are untouched)"


def _check_version(path: Path, version: Any) -> None:
    """Refuse a settings file of a version this code does not know (a newer rsx wrote it, or
    the file was edited): read with the wrong meaning, it could change what the lab does."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StoreError(f"{path} names an unknown settings version {version!r}{_RESTORE_SETTINGS}")
    if version > SETTINGS_VERSION:
        raise StoreError(
            f"{path} is of settings version {version}, newer than this rsx reads"
            f" ({SETTINGS_VERSION}): upgrade rsx to open this lab"
        )


#: The settings that may change after a lab is created, by the name ``rsx config`` gives them
#: (-> the LabSettings field). The embedder, distance and aggregation are fixed with the lab.
CHANGEABLE: dict[str, str] = {
    "threshold": "unknown_threshold",
    "margin_floor": "margin_floor",
    "default_candidates": "default_candidates",
    "captioner": "captioner",
    "default_resyntheses": "default_resyntheses",
    "generation_batch_size": "generation_batch_size",
    "embedding_batch_size": "embedding_batch_size",
    "max_pixels": "max_pixels",
}


def _upgraded(raw: dict[str, Any]) -> dict[str, Any]:
    """A settings file's content as this version reads it.

    ``generation_batch_size``: null means "auto". A file from before "auto" (version 1) that holds
    the old default, 8, with no recorded change of it, was given 8 because every lab was: it now
    follows the device ("auto"). An 8 set with 'rsx config set' is in ``changes`` and stays 8.
    """
    raw = dict(raw)
    if "generation_batch_size" in raw and raw["generation_batch_size"] is None:
        raw["generation_batch_size"] = AUTO_BATCH
    old = raw.get("version", 1)
    changes = raw.get("changes")
    chosen = isinstance(changes, list) and any(
        isinstance(c, dict) and c.get("key") == "generation_batch_size" for c in changes
    )
    if (
        isinstance(old, int)
        and old < 2
        and raw.get("generation_batch_size") == OLD_DEFAULT_GENERATION_BATCH
        and not chosen
    ):
        raw["generation_batch_size"] = AUTO_BATCH
    return raw


def _real(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_negative(value: Any) -> bool:
    """A finite real number at least 0 (bool is not a number here)."""
    return _real(value) and math.isfinite(value) and value >= 0


def parse_setting(key: str, text: str, *, generators: Sequence[str] = ()) -> Any:
    """The value ``rsx config set KEY TEXT`` means, checked (StoreError, one line, otherwise).

    ``none`` clears what may be cleared (threshold, default_candidates, captioner);
    ``auto`` is generation_batch_size's default (chosen for the device, per generator).
    ``generators``: the lab's active generator names, which default candidates must be among.
    """
    if key not in CHANGEABLE:
        raise StoreError(f"{key!r} cannot be changed; changeable: {', '.join(CHANGEABLE)}")
    text = text.strip()
    clear = text.lower() == "none"
    if key in ("threshold", "margin_floor"):
        if clear and key == "threshold":
            return None
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not _non_negative(number):
            extra = ", or none" if key == "threshold" else ""
            raise StoreError(f"{key} must be a number at least 0{extra}, not {text!r}")
        return number
    if key == "default_candidates":
        if clear:
            return None
        names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        if not names:
            raise StoreError("default_candidates needs generator names (comma-separated), or none")
        unknown = [n for n in names if n not in generators]
        if unknown:
            raise StoreError(
                f"not an active generator: {', '.join(unknown)}; see 'rsx generator list'"
            )
        return names
    if key == "captioner":
        if clear:
            return None
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise StoreError(f"captioner must be a local model folder, or none: no folder {text}")
        return str(folder.resolve())
    if key == "generation_batch_size" and text.lower() == AUTO_BATCH:
        return AUTO_BATCH
    try:  # the whole numbers: batch sizes, resyntheses, pixels
        whole = int(text)
    except ValueError:
        whole = 0
    if whole < 1:
        extra = ", or auto" if key == "generation_batch_size" else ""
        raise StoreError(f"{key} must be a whole number at least 1{extra}, not {text!r}")
    return whole
