"""Caption sources, in priority order: explicit text > sidecar text file > prompt embedded in the
image file > a captioning model.

A caption is what every candidate generator is asked to redraw, so it is the key of the resynthesis
cache: captions are normalised (Unicode NFC, whitespace collapsed) and hashed, and where each one
came from is always recorded. Metadata inside an image file (PNG text chunks, EXIF, XMP) is read
with a small hand-written PNG chunk walker and Pillow's header parsing only: no pixels are decoded,
compressed text is inflated with a size cap, and nothing in it is trusted beyond being evidence.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from resynth_index.errors import RsxError
from resynth_index.media.metadata import embedded_prompt
from resynth_index.media.text import normalise_caption

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from resynth_index.models.captioners import Captioner

__all__ = ["Caption", "caption_hash", "normalise_caption", "resolve_caption", "sidecar_text"]

SIDECAR_MAX_BYTES = 64 * 1024


# --------------------------------------------------------------------------- captions


def caption_hash(text: str) -> str:
    """SHA-256 hex digest of the normalised caption's UTF-8 bytes: the resynthesis cache key."""
    return hashlib.sha256(normalise_caption(text).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Caption:
    """A normalised caption, where it came from, and its hash."""

    text: str
    source: str  # "explicit" | "sidecar:<file>" | "metadata:<key>" | "model:<fingerprint[:12]>"
    hash: str

    @classmethod
    def make(cls, text: str, source: str) -> Caption:
        clean = normalise_caption(text)
        return cls(text=clean, source=source, hash=caption_hash(clean))


# --------------------------------------------------------------------------- sidecar files


def sidecar_text(image_path: Path) -> tuple[str, str] | None:
    """Text of a sidecar file next to the image: ``<name>.txt`` (``a.png.txt``) or ``<stem>.txt``.

    The more specific ``a.png.txt`` wins because ``a.txt`` may be shared by ``a.png`` and ``a.jpg``.
    Returns ``(text, filename)``; files that are empty, blank, unreadable or not regular files are
    skipped. At most 64 KiB is read, decoded as UTF-8 with replacement characters.
    """
    image_path = Path(image_path)
    candidates = [image_path.with_name(image_path.name + ".txt")]
    if image_path.suffix:
        candidates.append(image_path.with_name(image_path.stem + ".txt"))
    for candidate in candidates:
        text = _read_sidecar(candidate)
        if text is not None:
            return text, candidate.name
    return None


def _read_sidecar(path: Path) -> str | None:
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        with open(path, "rb") as handle:
            raw = handle.read(SIDECAR_MAX_BYTES)
    except OSError:
        return None
    text = raw.decode("utf-8-sig", errors="replace")
    return text if normalise_caption(text) else None


# --------------------------------------------------------------------------- resolution


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

    Raises ``RsxError`` for a blank explicit caption, and when no source gives a caption.
    """
    name = Path(image_path).name if image_path is not None else "the image"
    if explicit is not None:
        if not normalise_caption(explicit):
            raise RsxError(f"the caption given for {name} is blank")
        return Caption.make(explicit, "explicit")
    if image_path is not None:
        sidecar = sidecar_text(Path(image_path))
        if sidecar is not None:
            return Caption.make(sidecar[0], f"sidecar:{sidecar[1]}")
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
