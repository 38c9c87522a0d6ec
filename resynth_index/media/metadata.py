"""Text stored inside image files: prompts, descriptions, and tool/model evidence.

PNG text chunks (read by a small chunk walker, so text after the image data is found too), EXIF
ImageDescription / UserComment and XMP description. No pixels are decoded, compressed text is
inflated with a size cap, and nothing found is trusted beyond being evidence.

Every parser here reads hostile text (a chunk may hold a megabyte chosen to hurt), so each runs in
time linear in its input: the only regular expressions are ones that cannot backtrack beyond one
line or one run of a character class, the A1111 settings line is read by a one-pass scanner, XMP
by a defused XML parser that refuses DTDs and entities, and the ComfyUI graph walk looks at each
node a bounded number of times. Compressed text shares one inflation budget per file.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resynth_index.media.text import normalise_caption

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

METADATA_MAX_CHARS = 2_000
_METADATA_MAX_ENTRIES = 256
_TEXT_CHUNK_MAX_BYTES = 1 << 20  # one inflated zTXt/iTXt chunk
_TEXT_INFLATE_BUDGET = 4 << 20  # all inflated zTXt/iTXt chunks of one file together
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

# A1111 "parameters" text: the prompt, maybe a "Negative prompt:" line, then a settings line
# ("Steps: 20, Sampler: Euler a, ..."). Lines are cut where str.splitlines() cuts them: at one of
# these characters. A marked line is found by a pattern that starts with a line break (or by a
# match at the very start of the text), then the line's indent, then the marker: each line is
# tried once and no pattern can backtrack past its own line, so finding them is linear.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAK = re.compile(f"[{_LINE_BREAKS}]")
_INDENT = f"[^\\S{_LINE_BREAKS}]*"
_SETTINGS_MARK = r"Steps: *\d"
_A1111_MARK = r"(?:Negative prompt:|Steps: *\d)"
_SETTINGS_FIRST = re.compile(_INDENT + _SETTINGS_MARK)
_SETTINGS_NEXT = re.compile(f"[{_LINE_BREAKS}]" + _INDENT + _SETTINGS_MARK)
_A1111_FIRST = re.compile(_INDENT + _A1111_MARK)
_A1111_NEXT = re.compile(f"[{_LINE_BREAKS}]" + _INDENT + _A1111_MARK)
# Runs of one character class, only ever matched at a given position: they cannot backtrack, so
# each costs time linear in the run it consumes.
_SPACE_RUN = re.compile(r"\s*")
_KEY_RUN = re.compile(r"[\w \-/.()]*")  # the characters of an A1111 settings key
_ASCII_LETTER = re.compile(r"[A-Za-z]")  # the first character of a key
# The rest of a quoted value up to its closing quote, in the "unrolled loop" form: a run of plain
# characters, then (backslash, any character, run of plain characters) pairs. Every character can
# be taken by one part only, so a failed match gives back each character once: linear.
_QUOTED_REST = re.compile(r'[^\\"]*(?:\\.[^\\"]*)*"')
_SETTINGS_MAX_STEPS = 4096  # keys (and text that only looked like one) read from one line
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

_XMP_START = "<x:xmpmeta"
_XMP_END = "</x:xmpmeta>"
_DC_DESCRIPTION = "{http://purl.org/dc/elements/1.1/}description"
_RDF_LI = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}li"


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
        caption = normalise_caption(text)
        if caption and caption.lower() not in _PLACEHOLDER_TEXTS:
            return caption, key
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


def _prompt_candidates(evidence: _Evidence) -> Iterator[tuple[str, str]]:
    """``(text, key)`` of each place a prompt may be, in priority order, each worked out only
    when the ones before it gave nothing usable."""
    parameters = evidence.png_value("parameters")
    if parameters:
        yield _a1111_prompt(parameters[0]), f"png:{parameters[1]}"
    prompt = evidence.png_value("prompt")
    if prompt:
        text = prompt[0]
        if text.lstrip().startswith(("{", "[")):
            graph = _parse_json_object(text)
            if graph is not None:  # JSON: only a text found inside the graph will do
                text = _comfy_prompt(graph) if isinstance(graph, dict) else ""
        yield text or "", f"png:{prompt[1]}"
    for key in _PNG_DESCRIPTION_KEYS:
        value = evidence.png_value(key)
        if value:
            yield value[0], f"png:{value[1]}"
    if "ImageDescription" in evidence.exif:
        yield evidence.exif["ImageDescription"], "exif:ImageDescription"
    if "UserComment" in evidence.exif:
        comment = evidence.exif["UserComment"]
        if _looks_like_a1111(comment):
            comment = _a1111_prompt(comment)
        yield comment, "exif:UserComment"
    if evidence.xmp:
        description = _xmp_fields(evidence.xmp).get("description")
        if description:
            yield description, "xmp:description"


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
    """Walk the PNG chunks (all of them, also text after the image data) without decoding pixels.

    Compressed text shares one inflation budget and only the first eXIf chunk (the only one the
    PNG specification allows) is read, so a file of many small bombs costs no more than one.
    """
    inflater = _Inflater()
    exif_seen = False
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        position += 12 + length
        if len(body) < length or kind == b"IEND":
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            parsed = _png_text_chunk(kind, body, inflater)
            if parsed is None:
                continue
            key, value = parsed
            if key == _XMP_PNG_KEY:
                evidence.xmp = evidence.xmp or value
            elif len(evidence.png_text) < _METADATA_MAX_ENTRIES:
                evidence.png_text.append((key, value))
        elif kind == b"eXIf" and not exif_seen:
            exif_seen = True
            _collect_exif_bytes(body, evidence)


def _png_text_chunk(kind: bytes, body: bytes, inflater: _Inflater) -> tuple[str, str] | None:
    key_raw, sep, rest = body.partition(b"\x00")
    if not sep or not key_raw:
        return None
    key = key_raw.decode("latin-1")
    if kind == b"tEXt":
        return key, rest.decode("latin-1")
    if kind == b"zTXt":
        text = inflater.inflate(rest[1:]) if rest[:1] == b"\x00" else None
        return None if text is None else (key, text.decode("latin-1"))
    # iTXt: compression flag, method, language\0, translated keyword\0, UTF-8 text
    if len(rest) < 2:
        return None
    flag, method = rest[0], rest[1]
    parts = rest[2:].split(b"\x00", 2)
    if len(parts) != 3:
        return None
    payload: bytes | None = parts[2]
    if flag == 1:
        payload = inflater.inflate(parts[2]) if method == 0 else None
    if payload is None:
        return None
    return key, payload.decode("utf-8", errors="replace")


class _Inflater:
    """Inflates the compressed text chunks of one file within a shared budget of output bytes."""

    def __init__(self) -> None:
        self.left = _TEXT_INFLATE_BUDGET

    def inflate(self, compressed: bytes) -> bytes | None:
        """zlib-inflate at most _TEXT_CHUNK_MAX_BYTES and what is left of the budget; text that
        would be larger (a text bomb) is dropped, and what was inflated still counts. A stream
        that turns out corrupt counts as the most it could have cost."""
        limit = min(_TEXT_CHUNK_MAX_BYTES, self.left)
        if limit <= 0:
            return None
        try:
            stream = zlib.decompressobj()
            out = stream.decompress(compressed, limit)
        except zlib.error:
            self.left -= limit
            return None
        self.left -= len(out)
        return None if stream.unconsumed_tail else out


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
    """An uncompressed XMP packet anywhere in the file, for formats Pillow does not expose it in.

    Two substring searches, the second bounded to 1 MiB after the start: linear in the file.
    """
    start = data.find(_XMP_START.encode())
    if start < 0:
        return None
    end = data.find(_XMP_END.encode(), start, start + _XMP_MAX_BYTES)
    if end < 0:
        return None
    return data[start : end + len(_XMP_END)].decode("utf-8", errors="replace")


def _xmp_fields(xmp: str) -> dict[str, str]:
    """dc:description (the x-default language, else the first) and CreatorTool from an XMP packet.

    The packet is parsed with defusedxml, which refuses any DTD, entity declaration or external
    reference (entity bombs, external entities): such a packet, or one that is not XML at all,
    gives no fields. Parsing is linear in the packet, which is cut to 1 MiB first.
    """
    root = _parse_xmp(xmp[:_XMP_MAX_BYTES])
    if root is None:
        return {}
    fields: dict[str, str] = {}
    description = _xmp_description(root)
    if description is not None:
        fields["description"] = description
    tool = _xmp_creator_tool(root)
    if tool is not None:
        fields["CreatorTool"] = tool
    return {key: value.strip() for key, value in fields.items() if value.strip()}


def _parse_xmp(xmp: str) -> Element | None:
    """The root element of an XMP packet, or ``None`` when it is hostile or not XML.

    Where the text holds an ``x:xmpmeta`` element only that element is parsed, so the
    ``<?xpacket?>`` wrapper or stray bytes around it do not matter; a DTD before it refuses the
    packet. The parse is one pass of expat, and defusedxml refuses any DTD or entity it meets.
    """
    from xml.etree.ElementTree import ParseError

    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import fromstring

    start = xmp.find(_XMP_START)
    end = xmp.find(_XMP_END, max(start, 0))
    if start >= 0 and end >= 0:
        if xmp.find("<!DOCTYPE", 0, start) >= 0 or xmp.find("<!ENTITY", 0, start) >= 0:
            return None
        xmp = xmp[start : end + len(_XMP_END)]
    try:
        return fromstring(xmp, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (DefusedXmlException, ParseError, ValueError, LookupError, RecursionError):
        return None


def _local_name(name: Any) -> str:
    """``CreatorTool`` for ``{http://ns.adobe.com/xap/1.0/}CreatorTool`` (and for itself)."""
    return name.rpartition("}")[2] if isinstance(name, str) else ""


def _xmp_description(root: Element) -> str | None:
    """Text of the first dc:description element, else of a dc:description attribute."""
    element = next(root.iter(_DC_DESCRIPTION), None)
    if element is not None:
        items = list(element.iter(_RDF_LI))
        chosen = next(
            (item for item in items if any("x-default" in v for v in item.attrib.values())),
            items[0] if items else None,
        )
        if chosen is not None:
            return "".join(chosen.itertext())
        return " ".join(element.itertext())
    for node in root.iter():
        value = node.attrib.get(_DC_DESCRIPTION)
        if value is not None:
            return value
    return None


def _xmp_creator_tool(root: Element) -> str | None:
    """Text of the first CreatorTool element (any namespace), else of a CreatorTool attribute."""
    for node in root.iter():
        if _local_name(node.tag) == "CreatorTool":
            return "".join(node.itertext())
    for node in root.iter():
        for name, value in node.attrib.items():
            if _local_name(name) == "CreatorTool":
                return value
    return None


def _marked_lines(
    text: str, first: re.Pattern[str], following: re.Pattern[str], literals: tuple[str, ...]
) -> Iterator[int]:
    """Start offsets of the lines (as str.splitlines() cuts them) that begin with a marker.

    ``first`` matches the marker on the first line, ``following`` a line break then the marker;
    a text that holds none of ``literals`` is skipped with one substring search.
    """
    if not any(literal in text for literal in literals):
        return
    if first.match(text):
        yield 0
    for match in following.finditer(text):
        yield match.start() + 1


def _a1111_lines(text: str) -> Iterator[int]:
    """Start offsets of "Negative prompt:" lines and settings lines."""
    return _marked_lines(text, _A1111_FIRST, _A1111_NEXT, ("Negative prompt:", "Steps:"))


def _looks_like_a1111(text: str) -> bool:
    """Whether a text has a "Negative prompt:" line or a settings line."""
    return next(_a1111_lines(text), None) is not None


def _a1111_prompt(text: str) -> str:
    """The prompt of an Automatic1111 ``parameters`` text: every line before the negative prompt
    or the settings line, joined by newlines (the whole text when neither is present)."""
    marked = next(_a1111_lines(text), None)
    if marked is None:
        return text
    return "\n".join(text[:marked].splitlines())


def _a1111_settings(text: str) -> dict[str, str]:
    """``Key: value`` pairs of the last settings line ("Steps: 20, Sampler: Euler a, Model: x")."""
    lines = _marked_lines(text, _SETTINGS_FIRST, _SETTINGS_NEXT, ("Steps:",))
    last = deque(lines, maxlen=1)
    if not last:
        return {}
    line_break = _LINE_BREAK.search(text, last[0])
    return _settings_pairs(text[last[0] : line_break.start() if line_break else len(text)])


def _settings_pairs(line: str) -> dict[str, str]:
    """The ``Key: value`` pairs of one settings line, read in one left-to-right pass.

    A key starts with an ASCII letter and runs over word characters, spaces and ``-/.()`` up to a
    colon; a value is a double-quoted string (backslash escapes a character; the quotes are
    dropped) that ends the item, or else everything up to the next comma. Text that is no key is
    skipped. The first value of a repeated key wins.

    Every character is looked at a bounded number of times, by str methods and single-class
    matches that cannot backtrack; and the scan stops after _SETTINGS_MAX_STEPS items (a real line
    has a few dozen), so a hostile megabyte-long line costs milliseconds.
    """
    settings: dict[str, str] = {}
    position, end = 0, len(line)
    for _ in range(_SETTINGS_MAX_STEPS):
        letter = _ASCII_LETTER.search(line, position)  # no key starts before the next letter
        if letter is None:
            break
        start = letter.start()
        colon = _run_end(_KEY_RUN, line, start)
        if colon == end or line[colon] != ":":
            position = colon  # a key starting anywhere in this run would stop here too
            continue
        value, position = _setting_value(line, colon + 1)
        key, value = line[start:colon].strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key and value:
            settings.setdefault(key, value)
    return settings


def _setting_value(line: str, position: int) -> tuple[str, int]:
    """The raw value that starts at ``position`` (after a key's colon) and where the next key may
    start: a quoted string when it is followed by a comma or the end, else the text to the comma."""
    start = _run_end(_SPACE_RUN, line, position)
    if line.startswith('"', start):
        close = _closing_quote(line, start + 1)
        if close >= 0 and (close + 1 == len(line) or line[close + 1] == ","):
            return line[start : close + 1], close + 2
    comma = line.find(",", start)
    if comma < 0:
        return line[start:], len(line)
    return line[start:comma], comma + 1


def _run_end(run: re.Pattern[str], line: str, position: int) -> int:
    """Where a run of one character class that starts at ``position`` ends."""
    match = run.match(line, position)
    return match.end() if match else position


def _closing_quote(line: str, position: int) -> int:
    """Index of the double quote that closes a string whose body starts at ``position``, or -1.

    A backslash escapes the character after it, so a quote is escaped when an odd number of
    backslashes stands right before it. A value's opening quote follows a colon or whitespace, so
    no scan runs past the next value's start: scans never overlap and together stay linear.
    """
    quote = line.find('"', position)
    if quote < 0:
        return -1
    body = line[position:quote]
    if (len(body) - len(body.rstrip("\\"))) % 2 == 0:
        return quote
    rest = _QUOTED_REST.match(line, quote + 1)  # the first quote was escaped: skip escapes in C
    return rest.end() - 1 if rest else -1


def _parse_json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _node_order(node_id: str) -> tuple[int, int, str]:
    """Sort key for graph node ids: decimal ids in numeric order, then the others by name.

    Numeric order comes from (length without leading zeros, digits), never from ``int()``: an id
    of thousands of digits would be slow to convert or refused by Python's digit limit.
    """
    if node_id.isascii() and node_id.isdigit():
        digits = node_id.lstrip("0")
        return (0, len(digits), digits)
    return (1, 0, node_id)


def _node_key(item: tuple[str, Any]) -> tuple[int, int, str]:
    return _node_order(item[0])


def _node_reference(value: Any) -> str | None:
    """The node id a ComfyUI input links to (``["6", 0]`` links to node "6"), or ``None``."""
    if isinstance(value, list) and value and isinstance(value[0], (str, int)):
        return str(value[0])
    return None


def _comfy_prompt(graph: dict[str, Any]) -> str:
    """The positive prompt text of a ComfyUI API graph, or "" when none can be found.

    First the CLIPTextEncode node wired to a sampler's ``positive`` input; otherwise the first
    CLIPTextEncode node (by id) that no sampler uses as its ``negative`` input. Each node's text
    is looked up once however many samplers link to it, so the walk is linear in the graph.
    """
    nodes = {str(key): node for key, node in graph.items() if isinstance(node, dict)}
    texts: dict[str, str | None] = {}

    def encoded_text(node_id: str) -> str | None:
        if node_id not in texts:
            texts[node_id] = _encoder_text(nodes.get(node_id))
        return texts[node_id]

    order = sorted(nodes, key=_node_order)
    negatives: set[str] = set()
    for node_id in order:
        inputs = _inputs_of(nodes[node_id])
        negative = _node_reference(inputs.get("negative"))
        if negative is not None:
            negatives.add(negative)
        positive = _node_reference(inputs.get("positive"))
        if positive is not None:
            text = encoded_text(positive)
            if text:
                return text
    for node_id in order:
        if node_id not in negatives:
            text = encoded_text(node_id)
            if text:
                return text
    return ""


def _inputs_of(node: dict[str, Any]) -> dict[str, Any]:
    inputs = node.get("inputs")
    return inputs if isinstance(inputs, dict) else {}


def _encoder_text(node: Any) -> str | None:
    """The non-blank ``text`` (or ``text_g``, ``text_l``) of a CLIPTextEncode node, else None."""
    if not isinstance(node, dict):
        return None
    class_type = node.get("class_type")
    if not isinstance(class_type, str) or "CLIPTextEncode" not in class_type:
        return None
    for key in ("text", "text_g", "text_l"):
        value = _inputs_of(node).get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


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
