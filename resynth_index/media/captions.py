"""Caption sources, in priority order: explicit text > sidecar text file > prompt embedded in the
image file > a captioning model.

A caption is what every candidate generator is asked to redraw, so it is the key of the resynthesis
cache: captions are normalised (Unicode NFC, whitespace collapsed) and hashed, and where each one
came from is always recorded. Metadata inside an image file (PNG text chunks, EXIF, XMP) is read
with a small hand-written PNG chunk walker and Pillow's header parsing only: no pixels are decoded,
compressed text is inflated with a size cap, and nothing in it is trusted beyond being evidence.
"""

from __future__ import annotations

import codecs
import hashlib
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from resynth_index.errors import RsxError
from resynth_index.media.metadata import embedded_prompt
from resynth_index.media.text import normalise_caption

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "Caption",
    "Sidecar",
    "caption_hash",
    "find_sidecar",
    "normalise_caption",
    "resolve_caption",
    "sidecar_names",
    "sidecar_text",
]

SIDECAR_MAX_BYTES = 64 * 1024


# --------------------------------------------------------------------------- captions


def caption_hash(text: str) -> str:
    """SHA-256 hex digest of the normalised caption's UTF-8 bytes: the resynthesis cache key."""
    return hashlib.sha256(normalise_caption(text).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Caption:
    """A normalised caption, where it came from, and its hash."""

    text: str
    # "explicit" | "sidecar:<file>[ (<other file> also present)]" | "metadata:<key>"
    # | "model:<fingerprint[:12]>"
    source: str
    hash: str

    @classmethod
    def make(cls, text: str, source: str) -> Caption:
        clean = normalise_caption(text)
        return cls(text=clean, source=source, hash=caption_hash(clean))


# --------------------------------------------------------------------------- sidecar files


@dataclass(frozen=True)
class Sidecar:
    """The sidecar text file a caption came from, and any other sidecar left unused beside it."""

    text: str  # as read (not yet normalised)
    name: str  # the file used, e.g. ``a.png.txt``
    also_present: tuple[str, ...] = ()  # other sidecar files next to the image, not used

    @property
    def source(self) -> str:
        """The caption source as recorded: ``sidecar:a.png.txt (a.txt also present)``."""
        if not self.also_present:
            return f"sidecar:{self.name}"
        return f"sidecar:{self.name} ({', '.join(self.also_present)} also present)"


def sidecar_names(image_path: Path) -> list[Path]:
    """The sidecar files an image may have, most specific first: ``a.png.txt``, ``a.txt``."""
    image_path = Path(image_path)
    names = [image_path.with_name(image_path.name + ".txt")]
    if image_path.suffix:
        names.append(image_path.with_name(image_path.stem + ".txt"))
    return names


def find_sidecar(image_path: Path) -> Sidecar | None:
    """The sidecar text next to the image: ``<name>.txt`` (``a.png.txt``) or ``<stem>.txt``.

    The more specific ``a.png.txt`` wins because ``a.txt`` may be shared by ``a.png`` and ``a.jpg``;
    when both exist the result names the other one (``also_present``), so the choice is reported.
    Files that are empty, blank, unreadable or not regular files are skipped. At most 64 KiB is
    read. The text must be UTF-8 (a leading byte-order mark is dropped): a sidecar in any other
    encoding raises ``RsxError`` naming it, rather than giving a garbled caption.
    """
    candidates = sidecar_names(image_path)
    for n, candidate in enumerate(candidates):
        text = _read_sidecar(candidate)
        if text is not None:
            others = tuple(other.name for other in candidates[n + 1 :] if _is_file(other))
            return Sidecar(text=text, name=candidate.name, also_present=others)
    return None


def sidecar_text(image_path: Path) -> tuple[str, str] | None:
    """``(text, filename)`` of the image's sidecar file (see ``find_sidecar``), or None."""
    found = find_sidecar(image_path)
    return (found.text, found.name) if found is not None else None


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _read_sidecar(path: Path) -> str | None:
    """The file's text, or None when it is not a readable regular file or holds only blanks."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        with open(path, "rb") as handle:
            raw = handle.read(SIDECAR_MAX_BYTES + 1)
    except OSError:
        return None
    cut = len(raw) > SIDECAR_MAX_BYTES
    raw = raw[:SIDECAR_MAX_BYTES].removeprefix(codecs.BOM_UTF8)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    try:
        # a file cut at the size cap may end inside a character: that tail is dropped, not refused
        text = decoder.decode(raw, final=not cut)
    except UnicodeDecodeError:
        raise RsxError(f"sidecar {path.name} is not UTF-8 text; re-save it as UTF-8") from None
    return text if normalise_caption(text) else None


# --------------------------------------------------------------------------- resolution
class Captioner(Protocol):
    """Writes one caption per image; ``fingerprint`` changes whenever its output could (the
    models are in ``models/captioners.py``; a caption source is all this module needs)."""

    fingerprint: str

    def caption(self, images: Sequence[PILImage.Image]) -> list[str]: ...


def resolve_caption(
    *,
    explicit: str | None,
    image_path: Path | None,
    data: bytes,
    image: PILImage.Image,
    captioner: Captioner | None,
) -> Caption:
    """The caption for one image from the first source that gives one, in priority order:
    explicit text, sidecar file, prompt embedded in the file, captioning model.

    Raises ``RsxError`` for a blank explicit caption, a sidecar that is not UTF-8 text, and
    when no source gives a caption.
    """
    name = Path(image_path).name if image_path is not None else "the image"
    if explicit is not None:
        if not normalise_caption(explicit):
            raise RsxError(f"the caption given for {name} is blank")
        return Caption.make(explicit, "explicit")
    if image_path is not None:
        sidecar = find_sidecar(Path(image_path))
        if sidecar is not None:
            return Caption.make(sidecar.text, sidecar.source)
    embedded = embedded_prompt(data)
    if embedded is not None:
        return Caption.make(embedded[0], f"metadata:{embedded[1]}")
    if captioner is not None:
        texts = captioner.caption([image])
        text = texts[0] if texts else ""
        if not normalise_caption(text):
            model = captioner.fingerprint[:12]
            raise RsxError(f"the captioning model {model} wrote an empty caption for {name}")
        return Caption.make(text, f"model:{captioner.fingerprint[:12]}")
    raise RsxError(
        f"no caption for {name}: give --caption, a sidecar .txt, or configure a captioner"
    )
