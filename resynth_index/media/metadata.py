"""Text stored inside image files: prompts, descriptions, and tool/model evidence.

PNG text chunks (read by a small chunk walker, so text after the image data is found too), EXIF
ImageDescription / UserComment and XMP description. No pixels are decoded, compressed text is
inflated with a size cap, and nothing found is trusted beyond being evidence.
"""

from __future__ import annotations

import html
import io
import json
import re
import warnings
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


from resynth_index.media.text import normalise_caption

METADATA_MAX_CHARS = 2_000
_METADATA_MAX_ENTRIES = 256
_TEXT_CHUNK_MAX_BYTES = 1 << 20  # one inflated zTXt/iTXt chunk
_XMP_MAX_BYTES = 1 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SAFE_FORMATS = ("JPEG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PNG")

# PNG text keys that may hold a description, after "parameters" and "prompt" (matched ignoring case)
_PNG_DESCRIPTION_KEYS = ("description", "comment")
_XMP_PNG_KEY = "XML:com.adobe.xmp"

# Values cameras and tools write when there is no description; never a caption.
_PLACEHOLDER_TEXTS = frozenset(
    {
        "",
        "default",
        "none",
        "untitled",
        "image",
        "picture",
        "photo",
        "olympus digital camera",
        "sony dsc",
        "digital camera",
        "exif_jpeg_picture",
        "lead technologies inc. v1.01",
        "created with gimp",
    }
)

_STEPS_LINE = re.compile(r"Steps: *\d")
_NEGATIVE_LINE = "Negative prompt:"
_SETTING = re.compile(r'\s*([A-Za-z][\w \-/.()]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_MODEL_INPUT_KEYS = ("ckpt_name", "unet_name", "lora_name", "vae_name", "clip_name", "model_name")

_EXIF_IFD = 0x8769
_EXIF_TAGS = {
    0x010E: "ImageDescription",
    0x010F: "Make",
    0x0110: "Model",
    0x0131: "Software",
    0x013B: "Artist",
}
_EXIF_USER_COMMENT = 0x9286
_TIFF_XMP = 700


# --------------------------------------------------------------------------- embedded metadata


@dataclass
class _Evidence:
    """Text found inside one image file, before interpretation."""

    png_text: list[tuple[str, str]] = field(default_factory=list)
    exif: dict[str, str] = field(default_factory=dict)
    xmp: str | None = None
    comments: dict[str, str] = field(default_factory=dict)

    def png_value(self, key: str) -> tuple[str, str] | None:
        """(value, key as spelled in the file) of the first text chunk whose key matches."""
        for name, value in self.png_text:
            if name.lower() == key.lower():
                return value, name
        return None


def embedded_prompt(data: bytes) -> tuple[str, str] | None:
    """The prompt or description stored inside an image file, as ``(text, key)``, or ``None``.

    Keys, in the order tried: ``png:parameters`` (Automatic1111: the text before the
    "Negative prompt:" or "Steps:" line), ``png:prompt`` (plain text, or a ComfyUI graph whose
    positive CLIPTextEncode text is used; raw JSON is never returned), ``png:Description``,
    ``png:Comment``, ``exif:ImageDescription``, ``exif:UserComment``, ``xmp:description``.
    Unparseable files give ``None``; nothing here raises on hostile input.
    """
    evidence = _collect(data)
    for text, key in _prompt_candidates(evidence):
        if _usable(text):
            return normalise_caption(text), key
    return None


def embedded_metadata(data: bytes) -> dict[str, str]:
    """All text evidence in an image file: PNG text chunks, generator settings, EXIF, XMP.

    Keys look like ``png:parameters``, ``a1111:Model hash``, ``comfyui:ckpt_name``,
    ``exif:Software``, ``xmp:CreatorTool``; each value is cut to 2,000 characters. This is
    reported to the user as evidence only; it is never trusted to decide an attribution.
    """
    evidence = _collect(data)
    found: dict[str, str] = {}

    def add(key: str, value: str) -> None:
        value = value.replace("\x00", "").strip()
        if value and key not in found and len(found) < _METADATA_MAX_ENTRIES:
            found[key] = value[:METADATA_MAX_CHARS]

    for name, value in evidence.png_text:
        add(f"png:{name}", value)
    for name, value in evidence.exif.items():
        add(f"exif:{name}", value)
    for name, value in evidence.comments.items():
        add(name, value)
    if evidence.xmp:
        for name, value in _xmp_fields(evidence.xmp).items():
            add(f"xmp:{name}", value)
    parameters = evidence.png_value("parameters")
    for text in (parameters[0] if parameters else "", evidence.exif.get("UserComment", "")):
        for name, value in _a1111_settings(text).items():
            add(f"a1111:{name}", value)
    prompt = evidence.png_value("prompt")
    if prompt:
        graph = _parse_json_object(prompt[0])
        if isinstance(graph, dict):
            for name, value in _comfy_models(graph).items():
                add(f"comfyui:{name}", value)
    return found


def _prompt_candidates(evidence: _Evidence) -> list[tuple[str, str]]:
    candidates: list[tuple[str, str]] = []
    parameters = evidence.png_value("parameters")
    if parameters:
        candidates.append((_a1111_prompt(parameters[0]), f"png:{parameters[1]}"))
    prompt = evidence.png_value("prompt")
    if prompt:
        text = prompt[0]
        if text.lstrip().startswith(("{", "[")):
            graph = _parse_json_object(text)
            if graph is not None:  # JSON: only a text found inside the graph will do
                text = _comfy_prompt(graph) if isinstance(graph, dict) else ""
        candidates.append((text or "", f"png:{prompt[1]}"))
    for key in _PNG_DESCRIPTION_KEYS:
        value = evidence.png_value(key)
        if value:
            candidates.append((value[0], f"png:{value[1]}"))
    if "ImageDescription" in evidence.exif:
        candidates.append((evidence.exif["ImageDescription"], "exif:ImageDescription"))
    if "UserComment" in evidence.exif:
        comment = evidence.exif["UserComment"]
        if _looks_like_a1111(comment):
            comment = _a1111_prompt(comment)
        candidates.append((comment, "exif:UserComment"))
    if evidence.xmp:
        description = _xmp_fields(evidence.xmp).get("description")
        if description:
            candidates.append((description, "xmp:description"))
    return candidates


def _usable(text: str) -> bool:
    clean = normalise_caption(text)
    return bool(clean) and clean.lower() not in _PLACEHOLDER_TEXTS


def _collect(data: bytes) -> _Evidence:
    evidence = _Evidence()
    try:
        if data.startswith(_PNG_SIGNATURE):
            _collect_png(data, evidence)
        else:
            _collect_with_pillow(data, evidence)
    except Exception:  # hostile metadata yields less evidence, never an exception
        pass
    if evidence.xmp is None:
        evidence.xmp = _find_raw_xmp(data)
    return evidence


def _collect_png(data: bytes, evidence: _Evidence) -> None:
    """Walk the PNG chunks (all of them, also text after the image data) without decoding pixels."""
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        position += 12 + length
        if len(body) < length or kind == b"IEND":
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            parsed = _png_text_chunk(kind, body)
            if parsed is None:
                continue
            key, value = parsed
            if key == _XMP_PNG_KEY:
                evidence.xmp = evidence.xmp or value
            elif len(evidence.png_text) < _METADATA_MAX_ENTRIES:
                evidence.png_text.append((key, value))
        elif kind == b"eXIf":
            _collect_exif_bytes(body, evidence)


def _png_text_chunk(kind: bytes, body: bytes) -> tuple[str, str] | None:
    key_raw, sep, rest = body.partition(b"\x00")
    if not sep or not key_raw:
        return None
    key = key_raw.decode("latin-1")
    if kind == b"tEXt":
        return key, rest.decode("latin-1")
    if kind == b"zTXt":
        text = _inflate(rest[1:]) if rest[:1] == b"\x00" else None
        return None if text is None else (key, text.decode("latin-1"))
    # iTXt: compression flag, method, language\0, translated keyword\0, UTF-8 text
    if len(rest) < 2:
        return None
    flag, method = rest[0], rest[1]
    parts = rest[2:].split(b"\x00", 2)
    if len(parts) != 3:
        return None
    payload = parts[2]
    if flag == 1:
        payload = _inflate(payload) if method == 0 else None
        if payload is None:
            return None
    return key, payload.decode("utf-8", errors="replace")


def _inflate(compressed: bytes) -> bytes | None:
    """zlib-inflate at most _TEXT_CHUNK_MAX_BYTES; anything larger (a text bomb) is dropped."""
    try:
        inflater = zlib.decompressobj()
        out = inflater.decompress(compressed, _TEXT_CHUNK_MAX_BYTES)
    except zlib.error:
        return None
    return None if inflater.unconsumed_tail else out


def _collect_with_pillow(data: bytes, evidence: _Evidence) -> None:
    """JPEG, WebP, TIFF, GIF: Pillow parses headers and metadata segments on open, not pixels."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data), formats=_SAFE_FORMATS) as image:
            info = image.info
            exif = image.getexif()
    xmp = info.get("xmp") or exif.get(_TIFF_XMP)
    if xmp:
        evidence.xmp = _to_text(xmp[:_XMP_MAX_BYTES])
    comment = info.get("comment")
    if comment:
        fmt = (image.format or "image").lower()
        evidence.comments[f"{fmt}:comment"] = _to_text(comment)
    _collect_exif(exif, evidence)


def _collect_exif_bytes(raw: bytes, evidence: _Evidence) -> None:
    from PIL import Image

    exif = Image.Exif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exif.load(raw)
    except Exception:
        return
    _collect_exif(exif, evidence)


def _collect_exif(exif: Any, evidence: _Evidence) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag, name in _EXIF_TAGS.items():
            value = exif.get(tag)
            if value:
                evidence.exif.setdefault(name, _to_text(value))
        try:
            comment = exif.get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
        except Exception:
            comment = None
    if comment:
        evidence.exif.setdefault("UserComment", decode_user_comment(comment, exif))


def decode_user_comment(raw: bytes | str, exif: Any = None) -> str:
    """Decode an EXIF UserComment: an 8-byte character-set header, then the text.

    "UNICODE" means UTF-16; writers disagree on byte order (the standard says the file's, many
    tools write big-endian), so a byte-order mark wins, then whichever order puts the zero bytes of
    ASCII characters where they belong, then the file's own byte order.
    """
    if isinstance(raw, str):
        return raw.replace("\x00", "")
    if not isinstance(raw, bytes):
        return _to_text(raw)
    header, body = raw[:8], raw[8:]
    if header.startswith(b"UNICODE"):
        text = _decode_utf16(body, getattr(exif, "endian", None))
    elif header.startswith(b"ASCII") or header == b"\x00" * 8:
        text = body.decode("utf-8", errors="replace")
    elif header.startswith(b"JIS"):
        text = body.decode("shift_jis", errors="replace")
    else:  # no header at all: best effort on the whole field
        text = raw.decode("utf-8", errors="replace")
    return text.replace("\x00", "")


def _decode_utf16(body: bytes, endian: str | None) -> str:
    if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return body.decode("utf-16", errors="replace")
    even_zeros = body[0::2].count(0)
    odd_zeros = body[1::2].count(0)
    if even_zeros > odd_zeros:
        codec = "utf-16-be"
    elif odd_zeros > even_zeros:
        codec = "utf-16-le"
    else:
        codec = "utf-16-le" if endian == "<" else "utf-16-be"
    return body[: len(body) // 2 * 2].decode(codec, errors="replace")


def _to_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").replace("\x00", "")
    if isinstance(value, str):
        return value.replace("\x00", "")
    return str(value)


def _find_raw_xmp(data: bytes) -> str | None:
    """An uncompressed XMP packet anywhere in the file, for formats Pillow does not expose it in."""
    start = data.find(b"<x:xmpmeta")
    if start < 0:
        return None
    end = data.find(b"</x:xmpmeta>", start, start + _XMP_MAX_BYTES)
    if end < 0:
        return None
    return data[start : end + len(b"</x:xmpmeta>")].decode("utf-8", errors="replace")


def _xmp_fields(xmp: str) -> dict[str, str]:
    """dc:description (the x-default language, else the first) and CreatorTool from an XMP packet.

    Regular expressions rather than an XML parser: the packet is hostile input and only two
    fields are wanted, so no entity expansion or DTD handling can be triggered.
    """
    xmp = xmp[:_XMP_MAX_BYTES]
    fields: dict[str, str] = {}
    block = re.search(r"<dc:description\b[^>]*>(.*?)</dc:description>", xmp, re.S)
    if block:
        items = re.findall(r"<rdf:li\b([^>]*)>(.*?)</rdf:li>", block.group(1), re.S)
        chosen = next((text for attrs, text in items if "x-default" in attrs), None)
        if chosen is None and items:
            chosen = items[0][1]
        if chosen is None:
            chosen = re.sub(r"<[^>]*>", " ", block.group(1))
        fields["description"] = html.unescape(chosen)
    else:
        attribute = re.search(r'\bdc:description\s*=\s*"([^"]*)"', xmp)
        if attribute:
            fields["description"] = html.unescape(attribute.group(1))
    tool = re.search(r"<(\w+:)?CreatorTool\b[^>]*>(.*?)</(\w+:)?CreatorTool>", xmp, re.S)
    if tool:
        fields["CreatorTool"] = html.unescape(tool.group(2))
    else:
        attribute = re.search(r'\b(\w+:)?CreatorTool\s*=\s*"([^"]*)"', xmp)
        if attribute:
            fields["CreatorTool"] = html.unescape(attribute.group(2))
    return {key: value.strip() for key, value in fields.items() if value.strip()}


def _looks_like_a1111(text: str) -> bool:
    return any(
        line.lstrip().startswith(_NEGATIVE_LINE) or _STEPS_LINE.match(line.lstrip())
        for line in text.splitlines()
    )


def _a1111_prompt(text: str) -> str:
    """The prompt of an Automatic1111 ``parameters`` text: every line before the negative prompt
    or the settings line (the whole text when neither is present)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith(_NEGATIVE_LINE) or _STEPS_LINE.match(stripped):
            return "\n".join(lines[:index])
    return text


def _a1111_settings(text: str) -> dict[str, str]:
    """``Key: value`` pairs of the last settings line ("Steps: 20, Sampler: Euler a, Model: x")."""
    settings_lines = [line for line in text.splitlines() if _STEPS_LINE.match(line.lstrip())]
    if not settings_lines:
        return {}
    settings: dict[str, str] = {}
    for match in _SETTING.finditer(settings_lines[-1]):
        key, value = match.group(1).strip(), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key and value:
            settings.setdefault(key, value)
    return settings


def _parse_json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _node_order(node_id: str) -> tuple[int, int, str]:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _node_key(item: tuple[str, Any]) -> tuple[int, int, str]:
    return _node_order(item[0])


def _comfy_prompt(graph: dict[str, Any]) -> str:
    """The positive prompt text of a ComfyUI API graph, or "" when none can be found.

    First the CLIPTextEncode node wired to a sampler's ``positive`` input; otherwise the first
    CLIPTextEncode node (by id) that no sampler uses as its ``negative`` input.
    """
    nodes = {str(key): node for key, node in graph.items() if isinstance(node, dict)}

    def inputs_of(node: dict[str, Any]) -> dict[str, Any]:
        inputs = node.get("inputs")
        return inputs if isinstance(inputs, dict) else {}

    def encoded_text(node_id: Any) -> str | None:
        node = nodes.get(str(node_id))
        if node is None or "CLIPTextEncode" not in str(node.get("class_type", "")):
            return None
        for key in ("text", "text_g", "text_l"):
            value = inputs_of(node).get(key)
            if isinstance(value, str) and value.strip():
                return value
        return None

    order = sorted(nodes, key=_node_order)
    negatives: set[str] = set()
    for node_id in order:
        inputs = inputs_of(nodes[node_id])
        negative = inputs.get("negative")
        if isinstance(negative, list) and negative:
            negatives.add(str(negative[0]))
        positive = inputs.get("positive")
        if isinstance(positive, list) and positive:
            text = encoded_text(positive[0])
            if text:
                return text
    for node_id in order:
        if node_id not in negatives:
            text = encoded_text(node_id)
            if text:
                return text
    return ""


def _comfy_models(graph: dict[str, Any]) -> dict[str, str]:
    """Checkpoint, LoRA and VAE file names named in a ComfyUI graph (evidence of the generator)."""
    models: dict[str, str] = {}
    for node_id, node in sorted(((str(k), v) for k, v in graph.items()), key=_node_key):
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for key in _MODEL_INPUT_KEYS:
            value = inputs.get(key)
            if isinstance(value, str) and value:
                name = key if key not in models else f"{key}:{node_id}"
                models.setdefault(name, value)
    return models
