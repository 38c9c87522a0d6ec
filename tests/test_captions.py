"""Caption sources: normalising, sidecars, embedded prompts and metadata, priority, toy model."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from resynth_index.errors import ModelLoadError, RsxError
from resynth_index.media.captions import (
    Caption,
    Sidecar,
    caption_hash,
    find_sidecar,
    normalise_caption,
    resolve_caption,
    sidecar_text,
)
from resynth_index.media.metadata import embedded_metadata, embedded_prompt
from resynth_index.models.captioners import TransformersCaptioner

A1111 = (
    "a castle on a hill,\nat sunset, (detailed:1.2)\n"
    "Negative prompt: blurry, low quality\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 6ce0161689, "
    'Model: v1-5-pruned-emaonly, Lora hashes: "a: 1, b: 2", Version: v1.9.0'
)

COMFY_GRAPH = {
    "3": {
        "class_type": "KSampler",
        "inputs": {"seed": 1, "positive": ["6", 0], "negative": ["7", 0], "model": ["4", 0]},
    },
    "4": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"},
    },
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly, watermark", "clip": ["4", 1]}},
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "a red fox in snow", "clip": ["4", 1]},
    },
}


def _image(seed: int = 0, size: tuple[int, int] = (24, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png(text: dict[str, str] | None = None, **params) -> bytes:
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    _image().save(buffer, "PNG", pnginfo=info, **params)
    return buffer.getvalue()


def _png_with_info(info: PngInfo) -> bytes:
    buffer = io.BytesIO()
    _image().save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def _jpeg(exif: Image.Exif | None = None, **params) -> bytes:
    buffer = io.BytesIO()
    if exif is not None:
        params["exif"] = exif
    _image().save(buffer, "JPEG", **params)
    return buffer.getvalue()


def _exif_with_user_comment(raw: bytes) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = raw
    return exif


def _xmp(description: str, tool: str = "Adobe Photoshop 25.0") -> str:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:CreatorTool="{tool}">'
        '<dc:description><rdf:Alt><rdf:li xml:lang="fr">une description</rdf:li>'
        f'<rdf:li xml:lang="x-default">{description}</rdf:li></rdf:Alt></dc:description>'
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _insert_before_iend(png: bytes, chunk: bytes) -> bytes:
    position = png.rindex(b"IEND") - 4
    return png[:position] + chunk + png[position:]


# --------------------------------------------------------------------------- normalisation


def test_normalise_caption_collapses_whitespace_and_keeps_case() -> None:
    assert normalise_caption("  A  Cat\t\non\r\nthe   MAT \x00 ") == "A Cat on the MAT"
    assert normalise_caption("\n\t ") == ""


def test_normalise_caption_is_nfc_and_hash_follows() -> None:
    decomposed = "Cafe\u0301 au lait"
    composed = "Caf\u00e9 au lait"
    assert normalise_caption(decomposed) == composed
    assert caption_hash(decomposed) == caption_hash(f"  {composed} ")
    assert caption_hash("a cat") != caption_hash("A cat")
    assert len(caption_hash("x")) == 64


@given(st.text(max_size=60))
def test_normalise_caption_is_idempotent_and_single_spaced(text: str) -> None:
    once = normalise_caption(text)
    assert normalise_caption(once) == once
    assert "  " not in once and once == once.strip()
    assert caption_hash(text) == caption_hash(once)


def test_caption_make_normalises_and_hashes() -> None:
    caption = Caption.make(" two   dogs ", "explicit")
    assert caption == Caption("two dogs", "explicit", caption_hash("two dogs"))


# --------------------------------------------------------------------------- PNG text chunks


def test_a1111_parameters_prompt_stops_at_negative_prompt() -> None:
    assert embedded_prompt(_png({"parameters": A1111})) == (
        "a castle on a hill, at sunset, (detailed:1.2)",
        "png:parameters",
    )


def test_a1111_parameters_without_negative_stops_at_steps_line() -> None:
    text = "portrait of an owl\nSteps: 30, Sampler: DPM++ 2M, Seed: 7, Model: dreamshaper_8"
    assert embedded_prompt(_png({"parameters": text})) == ("portrait of an owl", "png:parameters")


def test_a1111_settings_are_reported_as_evidence() -> None:
    metadata = embedded_metadata(_png({"parameters": A1111, "Software": "A1111"}))
    assert metadata["a1111:Model"] == "v1-5-pruned-emaonly"
    assert metadata["a1111:Model hash"] == "6ce0161689"
    assert metadata["a1111:Lora hashes"] == "a: 1, b: 2"
    assert metadata["a1111:Steps"] == "20"
    assert metadata["png:Software"] == "A1111"
    assert metadata["png:parameters"].startswith("a castle")


def test_plain_prompt_chunk() -> None:
    assert embedded_prompt(_png({"prompt": "a bowl of   ramen"})) == (
        "a bowl of ramen",
        "png:prompt",
    )


def test_comfyui_prompt_graph_gives_positive_text_never_json() -> None:
    data = _png({"prompt": json.dumps(COMFY_GRAPH), "workflow": "{}"})
    assert embedded_prompt(data) == ("a red fox in snow", "png:prompt")
    assert embedded_metadata(data)["comfyui:ckpt_name"] == "sd_xl_base_1.0.safetensors"


def test_comfyui_graph_without_sampler_uses_first_text_encoder() -> None:
    graph = {"9": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "a lighthouse"}}}
    assert embedded_prompt(_png({"prompt": json.dumps(graph)})) == ("a lighthouse", "png:prompt")


def test_comfyui_graph_without_text_is_skipped() -> None:
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}
    assert embedded_prompt(_png({"prompt": json.dumps(graph)})) is None
    fallback = _png({"prompt": json.dumps(graph), "Description": "a harbour at dawn"})
    assert embedded_prompt(fallback) == ("a harbour at dawn", "png:Description")


@pytest.mark.parametrize("key", ["Description", "Comment"])
def test_description_and_comment_chunks(key: str) -> None:
    assert embedded_prompt(_png({key: "three pears on a plate"})) == (
        "three pears on a plate",
        f"png:{key}",
    )


def test_png_priority_parameters_over_prompt_over_description() -> None:
    data = _png({"Description": "desc", "prompt": "the prompt", "parameters": "params"})
    assert embedded_prompt(data) == ("params", "png:parameters")
    assert embedded_prompt(_png({"Comment": "c", "prompt": "p"})) == ("p", "png:prompt")
    assert embedded_prompt(_png({"Comment": "c", "Description": "d"}))[1] == "png:Description"


def test_compressed_and_international_text_chunks() -> None:
    info = PngInfo()
    info.add_text("parameters", "ein Schloß im Nebel\nSteps: 20", zip=True)  # zTXt, latin-1
    assert embedded_prompt(_png_with_info(info)) == ("ein Schloß im Nebel", "png:parameters")
    info = PngInfo()
    info.add_itxt("Description", "富士山と桜", lang="ja", zip=True)
    assert embedded_prompt(_png_with_info(info)) == ("富士山と桜", "png:Description")


def test_text_chunk_after_image_data_is_found() -> None:
    data = _insert_before_iend(_png(), _chunk(b"tEXt", b"Description\x00a late chunk"))
    assert embedded_prompt(data) == ("a late chunk", "png:Description")


def test_inflated_text_bomb_is_ignored() -> None:
    bomb = zlib.compress(b"a" * (4 << 20), 9)
    data = _insert_before_iend(_png(), _chunk(b"zTXt", b"Description\x00\x00" + bomb))
    assert embedded_prompt(data) is None


def test_metadata_values_are_truncated() -> None:
    metadata = embedded_metadata(_png({"Comment": "x" * 5000}))
    assert len(metadata["png:Comment"]) == 2000


# --------------------------------------------------------------------------- EXIF and XMP


def test_exif_image_description_in_jpeg() -> None:
    exif = Image.Exif()
    exif[0x010E] = "a sailing boat at dusk"
    exif[0x0131] = "GIMP 2.10"
    exif[0x010F] = "Canon"
    data = _jpeg(exif)
    assert embedded_prompt(data) == ("a sailing boat at dusk", "exif:ImageDescription")
    metadata = embedded_metadata(data)
    assert metadata["exif:Software"] == "GIMP 2.10"
    assert metadata["exif:Make"] == "Canon"


@pytest.mark.parametrize(
    "raw",
    [
        b"UNICODE\x00" + "ruelle à Montmartre".encode("utf-16-be"),
        b"UNICODE\x00" + "ruelle à Montmartre".encode("utf-16-le"),
        b"ASCII\x00\x00\x00ruelle \xc3\xa0 Montmartre",
        b"\x00" * 8 + "ruelle à Montmartre".encode(),
    ],
    ids=["unicode-be", "unicode-le", "ascii", "undefined"],
)
def test_exif_user_comment_charsets(raw: bytes) -> None:
    assert embedded_prompt(_jpeg(_exif_with_user_comment(raw))) == (
        "ruelle à Montmartre",
        "exif:UserComment",
    )


def test_user_comment_holding_a1111_parameters_gives_only_the_prompt() -> None:
    raw = b"UNICODE\x00" + A1111.encode("utf-16-be")
    data = _jpeg(_exif_with_user_comment(raw))
    assert embedded_prompt(data) == (
        "a castle on a hill, at sunset, (detailed:1.2)",
        "exif:UserComment",
    )
    assert embedded_metadata(data)["a1111:Model hash"] == "6ce0161689"


def test_camera_placeholder_description_is_not_a_caption() -> None:
    exif = Image.Exif()
    exif[0x010E] = "OLYMPUS DIGITAL CAMERA         "
    assert embedded_prompt(_jpeg(exif)) is None


def test_image_description_wins_over_user_comment() -> None:
    exif = _exif_with_user_comment(b"ASCII\x00\x00\x00the comment")
    exif[0x010E] = "the description"
    assert embedded_prompt(_jpeg(exif)) == ("the description", "exif:ImageDescription")


def test_xmp_description_in_png_itxt() -> None:
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", _xmp("a quiet library &amp; its cat"))
    data = _png_with_info(info)
    assert embedded_prompt(data) == ("a quiet library & its cat", "xmp:description")
    metadata = embedded_metadata(data)
    assert metadata["xmp:CreatorTool"] == "Adobe Photoshop 25.0"
    assert "png:XML:com.adobe.xmp" not in metadata


def test_xmp_description_in_jpeg_app1() -> None:
    data = _jpeg(xmp=_xmp("snowy owl on a branch", tool="Adobe Firefly").encode())
    assert embedded_prompt(data) == ("snowy owl on a branch", "xmp:description")
    assert embedded_metadata(data)["xmp:CreatorTool"] == "Adobe Firefly"


def test_exif_in_png_exif_chunk() -> None:
    exif = Image.Exif()
    exif[0x010E] = "a png with exif"
    assert embedded_prompt(_png(exif=exif)) == ("a png with exif", "exif:ImageDescription")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image at all",
        b"\x89PNG\r\n\x1a\n" + b"\xff" * 64,
        b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00garbage",
        np.random.default_rng(3).integers(0, 256, 2048, dtype=np.uint8).tobytes(),
    ],
    ids=["empty", "text", "broken-png", "broken-jpeg", "noise"],
)
def test_hostile_bytes_give_no_prompt_and_no_exception(data: bytes) -> None:
    assert embedded_prompt(data) is None
    assert isinstance(embedded_metadata(data), dict)


def test_plain_image_has_no_prompt() -> None:
    assert embedded_prompt(_png()) is None
    assert embedded_prompt(_jpeg()) is None


# --------------------------------------------------------------------------- sidecar files


def test_sidecar_stem_txt(tmp_path: Path) -> None:
    image = tmp_path / "sunset 1.png"
    (tmp_path / "sunset 1.txt").write_text("  golden\nsunset ", encoding="utf-8")
    assert sidecar_text(image) == ("  golden\nsunset ", "sunset 1.txt")


def test_sidecar_name_txt_wins_over_stem_txt(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    (tmp_path / "a.png.txt").write_text("specific", encoding="utf-8")
    (tmp_path / "a.txt").write_text("shared", encoding="utf-8")
    assert sidecar_text(image) == ("specific", "a.png.txt")


def test_blank_sidecar_is_ignored(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    (tmp_path / "a.png.txt").write_text(" \n\t", encoding="utf-8")
    assert sidecar_text(image) is None
    (tmp_path / "a.txt").write_text("fallback", encoding="utf-8")
    assert sidecar_text(image) == ("fallback", "a.txt")


def test_sidecar_reads_at_most_64_kib_and_drops_the_bom(tmp_path: Path) -> None:
    image = tmp_path / "big.jpg"
    (tmp_path / "big.txt").write_bytes(b"\xef\xbb\xbfok " + b"w" * 200_000)
    text, name = sidecar_text(image)
    assert name == "big.txt"
    assert text.startswith("ok w")
    assert len(text.encode("utf-8")) <= 64 * 1024


def test_sidecar_cut_at_the_cap_inside_a_character_is_not_refused(tmp_path: Path) -> None:
    image = tmp_path / "big.png"
    body = "é" * 40_000  # 2 bytes each: the 64 KiB cut lands on a character boundary or inside one
    (tmp_path / "big.txt").write_bytes(b"x" + body.encode("utf-8"))
    text, _ = sidecar_text(image)
    assert text == "x" + "é" * ((64 * 1024 - 1) // 2)


@pytest.mark.parametrize(
    "raw",
    [
        "vieux pêcheur".encode("latin-1"),
        "vieux pêcheur".encode("utf-16"),
        b"\xef\xbb\xbfvieux p\xeacheur",  # a BOM does not make Latin-1 bytes UTF-8
    ],
)
def test_sidecar_that_is_not_utf8_refuses_the_image_naming_the_file(
    tmp_path: Path, raw: bytes
) -> None:
    image = tmp_path / "x.png"
    (tmp_path / "x.txt").write_bytes(raw)
    with pytest.raises(RsxError) as caught:
        sidecar_text(image)
    assert str(caught.value) == "sidecar x.txt is not UTF-8 text; re-save it as UTF-8"
    with pytest.raises(RsxError, match="sidecar x.txt is not UTF-8"):
        _resolve_with_sidecar_bytes(tmp_path, image, raw)


def test_utf8_sidecar_with_a_bom_gives_the_clean_caption(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    caption = _resolve_with_sidecar_bytes(
        tmp_path, image, b"\xef\xbb\xbf" + "vieux pêcheur".encode()
    )
    assert (caption.text, caption.source) == ("vieux pêcheur", "sidecar:x.txt")


def test_the_sidecar_used_is_named_and_the_other_one_reported(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    (tmp_path / "x.txt").write_text("shared caption", encoding="utf-8")
    (tmp_path / "x.png.txt").write_text("specific caption", encoding="utf-8")
    found = find_sidecar(image)
    assert found == Sidecar("specific caption", "x.png.txt", ("x.txt",))
    caption = _resolve_with_sidecar_bytes(tmp_path, image, None)
    assert caption.text == "specific caption"
    assert caption.source == "sidecar:x.png.txt (x.txt also present)"
    (tmp_path / "x.txt").unlink()
    assert _resolve_with_sidecar_bytes(tmp_path, image, None).source == "sidecar:x.png.txt"


def test_a_blank_specific_sidecar_falls_back_without_a_note(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    (tmp_path / "x.png.txt").write_text("  ", encoding="utf-8")
    (tmp_path / "x.txt").write_text("shared caption", encoding="utf-8")
    assert find_sidecar(image) == Sidecar("shared caption", "x.txt")


def test_ingest_refuses_an_image_whose_sidecar_is_not_utf8(toy_lab: Path, tmp_path: Path) -> None:
    from resynth_index.lab import Lab
    from resynth_index.pipeline.ingest import ingest
    from resynth_index.pipeline.ingest_items import expand_paths

    image = tmp_path / "ref.png"
    image.write_bytes(_png())
    (tmp_path / "ref.txt").write_bytes("vieux pêcheur".encode("latin-1"))
    with Lab.open(toy_lab) as lab:
        summary = ingest(lab, expand_paths([image], role="reference", generator="toy-a"))
    assert summary.added == 0
    assert [(f.path, f.reason) for f in summary.failures] == [
        (str(image), "sidecar ref.txt is not UTF-8 text; re-save it as UTF-8")
    ]


def _resolve_with_sidecar_bytes(tmp_path: Path, image: Path, raw: bytes | None) -> Caption:
    data = _png()
    image.write_bytes(data)
    if raw is not None:
        (tmp_path / (image.stem + ".txt")).write_bytes(raw)
    return resolve_caption(
        explicit=None, image_path=image, data=data, image=_image(), captioner=None
    )


def test_directory_named_like_a_sidecar_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "x.txt").mkdir()
    assert sidecar_text(tmp_path / "x.png") is None


# --------------------------------------------------------------------------- priority


class FakeCaptioner:
    fingerprint = "f" * 64

    def __init__(self, text: str = "a model caption") -> None:
        self.text = text
        self.calls = 0

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        self.calls += 1
        return [self.text for _ in images]


def _resolve(tmp_path: Path, *, explicit=None, sidecar=None, data=None, captioner=None):
    path = tmp_path / "img.png"
    data = data if data is not None else _png()
    path.write_bytes(data)
    if sidecar is not None:
        (tmp_path / "img.txt").write_text(sidecar, encoding="utf-8")
    return resolve_caption(
        explicit=explicit, image_path=path, data=data, image=_image(), captioner=captioner
    )


def test_priority_order(tmp_path: Path) -> None:
    model = FakeCaptioner()
    tagged = _png({"parameters": "from metadata\nSteps: 1"})
    every = _resolve(tmp_path, explicit=" Given ", sidecar="side", data=tagged, captioner=model)
    assert (every.text, every.source) == ("Given", "explicit")
    no_explicit = _resolve(tmp_path, sidecar="side  car", data=tagged, captioner=model)
    assert (no_explicit.text, no_explicit.source) == ("side car", "sidecar:img.txt")
    (tmp_path / "img.txt").unlink()
    no_sidecar = _resolve(tmp_path, data=tagged, captioner=model)
    assert (no_sidecar.text, no_sidecar.source) == ("from metadata", "metadata:png:parameters")
    assert model.calls == 0
    only_model = _resolve(tmp_path, captioner=model)
    assert only_model.source == "model:" + "f" * 12
    assert only_model.hash == caption_hash("a model caption")
    assert model.calls == 1


def test_without_image_path_sidecars_are_not_consulted(tmp_path: Path) -> None:
    caption = resolve_caption(
        explicit=None, image_path=None, data=_png({"Comment": "c"}), image=_image(), captioner=None
    )
    assert caption.source == "metadata:png:Comment"


def test_blank_explicit_caption_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RsxError, match="img.png"):
        _resolve(tmp_path, explicit="  \n ", sidecar="side")


def test_no_source_at_all_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RsxError) as caught:
        _resolve(tmp_path)
    assert str(caught.value) == (
        "no caption for img.png: give --caption, a sidecar .txt, or configure a captioner"
    )


def test_empty_model_caption_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RsxError, match="empty caption"):
        _resolve(tmp_path, captioner=FakeCaptioner(" "))


# --------------------------------------------------------------------------- toy captioner


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resynth_index.models.toyzoo.captioner import save_toy_captioner

    return save_toy_captioner(tmp_path_factory.mktemp("toy-captioner"), seed=0)


@pytest.fixture(scope="module")
def toy_captioner(toy_folder: Path) -> TransformersCaptioner:
    return TransformersCaptioner(toy_folder, device="cpu", max_new_tokens=8)


def test_toy_captioner_loads_and_captions_deterministically(
    toy_captioner: TransformersCaptioner,
) -> None:
    images = [_image(seed) for seed in range(4)]
    first = toy_captioner.caption(images)
    assert len(first) == 4
    assert all(text and text == normalise_caption(text) for text in first)
    assert toy_captioner.caption(images) == first
    assert toy_captioner.caption(images[2:3]) == first[2:3]  # batching does not change a caption
    assert len(set(first)) > 1  # the image matters
    assert toy_captioner.caption([]) == []


def test_toy_captioner_reload_gives_same_fingerprint_and_captions(
    toy_folder: Path, toy_captioner: TransformersCaptioner
) -> None:
    again = TransformersCaptioner(toy_folder, device="cpu", max_new_tokens=8)
    assert again.fingerprint == toy_captioner.fingerprint
    assert again.caption([_image(5)]) == toy_captioner.caption([_image(5)])
    longer = TransformersCaptioner(toy_folder, device="cpu", max_new_tokens=9)
    assert longer.fingerprint != toy_captioner.fingerprint


def test_toy_seed_changes_weights_and_fingerprint(
    tmp_path: Path, toy_captioner: TransformersCaptioner
) -> None:
    import torch

    from resynth_index.models.toyzoo.captioner import build_toy_captioner, save_toy_captioner

    first, _ = build_toy_captioner(0)
    second, _ = build_toy_captioner(0)
    state = torch.random.get_rng_state()
    third, _ = build_toy_captioner(1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name])
    assert any(
        not torch.equal(tensor, third.state_dict()[name])
        for name, tensor in first.state_dict().items()
    )
    other = TransformersCaptioner(
        save_toy_captioner(tmp_path / "s1", seed=1), device="cpu", max_new_tokens=8
    )
    assert other.fingerprint != toy_captioner.fingerprint


def test_model_caption_source_through_resolve(
    tmp_path: Path, toy_captioner: TransformersCaptioner
) -> None:
    caption = _resolve(tmp_path, captioner=toy_captioner)
    assert caption.source == f"model:{toy_captioner.fingerprint[:12]}"
    assert caption.text == toy_captioner.caption([_image()])[0]


def test_captioner_accepts_non_rgb_images(toy_captioner: TransformersCaptioner) -> None:
    captions = toy_captioner.caption([Image.new("LA", (9, 9), (30, 200)), Image.new("L", (3, 50))])
    assert len(captions) == 2 and all(captions)


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        TransformersCaptioner(tmp_path / "nothing here", device="cpu")


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="config.json"):
        TransformersCaptioner(tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="not a folder"):
        TransformersCaptioner(tmp_path / "notes.txt", device="cpu")


def test_corrupt_weights(tmp_path: Path, toy_folder: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(toy_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as caught:
        TransformersCaptioner(broken, device="cpu")
    assert "broken" in str(caught.value) and "\n" not in str(caught.value)


def test_missing_weights_file(tmp_path: Path, toy_folder: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(toy_folder, bare)
    (bare / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError):
        TransformersCaptioner(bare, device="cpu")


def test_weights_missing_a_tensor_are_refused(tmp_path: Path, toy_folder: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(toy_folder, partial)
    tensors = load_file(partial / "model.safetensors")
    dropped = sorted(tensors)[3]
    del tensors[dropped]
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing"):
        TransformersCaptioner(partial, device="cpu")


def test_config_of_a_model_that_is_not_image_to_text(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError):
        TransformersCaptioner(folder, device="cpu")
