"""An uploaded query: a ``multipart/form-data`` body streamed into a private file.

The body is never held whole in memory: it is parsed as it arrives, the ``image`` part is written
chunk by chunk to a new file (random name, mode 0600) in the service's private folder, and the
size limit is enforced while streaming. Nothing the client sends names a file: its file name is
kept only as text for the answer. The other fields are small text (``MAX_FIELD_BYTES``).

Refusals raise ``UploadRejected`` with the HTTP status to answer: 415 for a body that is not
multipart form data or an image whose first bytes are no format rsx reads, 413 over a limit, 400
for a malformed form or a missing or empty image. The image's pixels are judged later by the same
hostile-file loader as ingest (``media/images``), when the worker reads the file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from resynth_index.store.locks import process_alive

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 32
#: Form fields and multipart framing allowed on top of the image's own limit.
FORM_ALLOWANCE = 1024 * 1024
#: How much of an oversized body is read and thrown away so the client can read the 413
#: (a client still sending when the connection closes may never see the answer).
DRAIN_LIMIT = 16 * 1024 * 1024
IMAGE_FIELD = "image"
#: Uploads up to this size are parsed and written on the event loop, larger ones beside it:
#: a hop to a thread costs 0.1-3 ms on a busy 2-core machine, writing 1 MiB to the page cache
#: well under a millisecond.
INLINE_BYTES = 1024 * 1024

#: Leading bytes of the formats the hostile-file loader accepts -> their media type.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


#: The folder inside a lab that holds each running service's private upload folder.
UPLOADS_DIR = "uploads"


def private_upload_folder(lab_root: Path) -> Path:
    """A new private folder (mode 0700) for this process's uploads, inside the lab, named for
    this host and process; the folders of services on this host that died without cleaning up
    (SIGKILL, a power cut) are removed first, with whatever half-received files they hold."""
    parent = Path(lab_root) / UPLOADS_DIR
    parent.mkdir(exist_ok=True)
    host = socket.gethostname()
    for folder in parent.iterdir():
        name_host, _, rest = folder.name.rpartition("-pid")
        pid = rest.partition("-")[0]
        if name_host == host and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    folder = parent / f"{host}-pid{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir(mode=0o700)
    return folder


class UploadRejected(Exception):
    """An upload refused: ``status`` is the HTTP status, the message one line for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """A parsed form: the image in its private file (if one came), and the text fields."""

    path: Path | None = None
    filename: str = ""
    size: int = 0
    media_type: str | None = None
    fields: dict[str, list[str]] = field(default_factory=dict)

    def text(self, name: str) -> str | None:
        """The first value of a text field, None when absent."""
        values = self.fields.get(name)
        return values[0] if values else None

    def discard(self) -> None:
        """Remove the private file (safe to call twice)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def sniff_media_type(head: bytes) -> str | None:
    """The media type the first bytes of a file announce, among the formats rsx reads."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for signature, media_type in _SIGNATURES:
        if head.startswith(signature):
            return media_type
    return None


def display_name(filename: str) -> str:
    """How an upload is named in its answer and audit row: ``upload:<base name>``.

    The client's name is text only (never a path here): its last path component, control
    characters dropped, at most 200 characters.
    """
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()[:200]
    return f"upload:{base or 'image'}"


async def read_upload(
    content_type: str | None,
    content_length: str | None,
    chunks: AsyncIterator[bytes],
    folder: Path,
    max_image_bytes: int,
) -> Upload:
    """Parse a multipart body from ``chunks`` into an ``Upload`` (UploadRejected on refusal).

    An oversized body is read on, up to ``DRAIN_LIMIT`` more bytes, and thrown away, so the
    client is still listening when the 413 comes.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadRejected(
            415, f"send the image as multipart/form-data in the field '{IMAGE_FIELD}'"
        )
    body_limit = max_image_bytes + FORM_ALLOWANCE
    if content_length is not None and content_length.isdigit():
        if int(content_length) > body_limit + DRAIN_LIMIT:
            raise UploadRejected(413, _too_large(max_image_bytes))
    form = _FormBuilder(folder, max_image_bytes)
    try:
        parser = MultipartParser(boundary, form.callbacks())
    except Exception:
        raise UploadRejected(400, "the multipart boundary is not valid") from None
    received = 0
    refusal: UploadRejected | None = None
    try:
        async for chunk in chunks:
            received += len(chunk)
            if refusal is not None:
                if received > body_limit + DRAIN_LIMIT:
                    break
                continue  # drained, thrown away
            if received > body_limit:
                refusal = UploadRejected(413, _too_large(max_image_bytes))
                continue
            try:
                # parsing writes the image's bytes to its file: off the event loop once the
                # upload is large (a thread hop costs more than a small upload's whole write)
                if received <= INLINE_BYTES:
                    parser.write(chunk)
                else:
                    await run_in_threadpool(parser.write, chunk)
            except UploadRejected as error:
                refusal = error
            except Exception:
                refusal = UploadRejected(400, "the multipart form data is malformed")
        if refusal is None:
            try:
                parser.finalize()
            except Exception:
                refusal = UploadRejected(400, "the multipart form data is malformed")
        if refusal is None:
            refusal = form.problem()
    except BaseException:
        form.upload.discard()
        form.close()
        raise
    form.close()
    if refusal is not None:
        form.upload.discard()
        raise refusal
    return form.upload


def _too_large(max_image_bytes: int) -> str:
    return f"the image is over the {max_image_bytes / 1024 / 1024:g} MB this service accepts"


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as the image file's header says, nothing decoded; None when the header
    cannot be read (the hostile-file loader then says why, with the rest of its checks)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a decompression-bomb warning: the size is what we ask
            with Image.open(path) as image:
                width, height = image.size
    except Exception:  # a hostile or broken header: not this function's to judge
        return None
    return int(width), int(height)


class _FormBuilder:
    """The parser's callbacks: headers per part, the image into its file, fields into text."""

    def __init__(self, folder: Path, max_image_bytes: int) -> None:
        self.folder = folder
        self.max_image_bytes = max_image_bytes
        self.upload = Upload()
        self.parts = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._name: str | None = None
        self._text: bytearray | None = None
        self._file: int | None = None  # the image's file descriptor while it is written
        self._head = bytearray()
        self._images = 0

    def callbacks(self) -> Any:
        """The parser's callbacks (python-multipart's ``MultipartCallbacks``)."""
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise UploadRejected(400, f"too many form fields (at most {MAX_PARTS})")
        self._headers = []
        self._name = None
        self._text = None

    def _header_end(self) -> None:
        self._headers.append((bytes(self._header_name).lower(), bytes(self._header_value)))
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        disposition = dict(self._headers).get(b"content-disposition", b"")
        _kind, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._name = name
        if name == IMAGE_FIELD:
            self._images += 1
            if self._images > 1:
                raise UploadRejected(400, "send one image per query")
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.upload.filename = filename
            path = self.folder / f"upload-{secrets.token_hex(12)}"
            self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self.upload.path = path
        elif b"filename" in options:
            raise UploadRejected(
                400, f"a file came in the field {name!r}: send the image in the field"
                f" '{IMAGE_FIELD}'"
            )  # fmt: skip
        else:
            self._text = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if self._file is not None:
            self.upload.size += len(piece)
            if self.upload.size > self.max_image_bytes:
                raise UploadRejected(413, _too_large(self.max_image_bytes))
            if len(self._head) < 16:
                self._head.extend(piece[: 16 - len(self._head)])
            os.write(self._file, piece)
        elif self._text is not None:
            self._text.extend(piece)
            if len(self._text) > MAX_FIELD_BYTES:
                raise UploadRejected(
                    413, f"the field {self._name!r} is over {MAX_FIELD_BYTES // 1024} KiB"
                )

    def _part_end(self) -> None:
        if self._file is not None:
            self._close_file()
        elif self._text is not None and self._name:
            try:
                value = bytes(self._text).decode("utf-8")
            except UnicodeDecodeError:
                raise UploadRejected(400, f"the field {self._name!r} is not UTF-8 text") from None
            self.upload.fields.setdefault(self._name, []).append(value)
        self._text = None

    def _close_file(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def close(self) -> None:
        """Close the image's file if a refusal left it open."""
        self._close_file()

    def problem(self) -> UploadRejected | None:
        """What is wrong with a form that parsed: no image, an empty one, an unknown format."""
        if self.upload.path is None:
            return UploadRejected(400, f"no image: send the file in the form field '{IMAGE_FIELD}'")
        if self.upload.size == 0:
            return UploadRejected(400, "the image is empty")
        self.upload.media_type = sniff_media_type(bytes(self._head))
        if self.upload.media_type is None:
            return UploadRejected(
                415, "not an image in a supported format (PNG, JPEG, WebP, GIF, BMP, TIFF)"
            )
        return None
