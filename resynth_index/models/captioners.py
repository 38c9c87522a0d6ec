"""Captioning models: a local transformers image-to-text folder, a ``media.captions.Captioner``.

Loaded with ``local_files_only=True`` and never with remote code; weights that do not match the
architecture are refused rather than silently re-initialised.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resynth_index.errors import ModelLoadError, RsxError
from resynth_index.media.text import normalise_caption
from resynth_index.models.fingerprints import combine, hash_json, hash_state_dict

if TYPE_CHECKING:
    from PIL import Image as PILImage


# --------------------------------------------------------------------------- captioning models


class TransformersCaptioner:
    """A local transformers image-to-text model folder (BLIP, GIT, VisionEncoderDecoder ...).

    Loaded with ``local_files_only=True`` and never with remote code. Decoding is greedy, so the
    same weights, settings and image always give the same caption. The fingerprint hashes the
    weights tensor by tensor plus the generation and preprocessing settings.
    """

    def __init__(self, path: str | Path, device: str = "auto", max_new_tokens: int = 40) -> None:
        from resynth_index.models.devices import resolve_device

        folder = Path(path)
        _check_model_folder(folder)
        if max_new_tokens < 1:
            raise RsxError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        self.path = folder
        self.max_new_tokens = int(max_new_tokens)
        self.device = resolve_device(device)
        self._processor, self._image_processor, self._tokenizer = _load_processing(folder)
        model = _load_model(folder)
        self.fingerprint = combine(
            hash_state_dict(model.state_dict()), hash_json(self._settings(model))
        )
        self._model = model.to(self.device).eval()

    def _settings(self, model: Any) -> dict[str, Any]:
        generation = model.generation_config.to_diff_dict()
        generation.pop("transformers_version", None)
        preprocessing = self._image_processor.to_dict() if self._image_processor else {}
        preprocessing.pop("transformers_version", None)
        vocabulary = self._tokenizer.get_vocab() if self._tokenizer is not None else {}
        return {
            "architecture": type(model).__name__,
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "generation_config": generation,
            "preprocessing": preprocessing,
            "vocabulary": hash_json(sorted(vocabulary.items())),
        }

    def caption(self, images: Sequence[PILImage.Image]) -> list[str]:
        """One normalised caption per image, in order (greedy decoding, one batch)."""
        import torch

        from resynth_index.media.images import normalise

        if not images:
            return []
        rgb = [image if image.mode == "RGB" else normalise(image) for image in images]
        if self._processor is not None:
            inputs = self._processor(images=rgb, return_tensors="pt")
        else:
            inputs = self._image_processor(images=rgb, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with torch.inference_mode():
            output = self._model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
            )
        prompt = inputs.get("input_ids")
        if prompt is not None and output.shape[1] >= prompt.shape[1]:
            if torch.equal(output[:, : prompt.shape[1]], prompt):
                output = output[:, prompt.shape[1] :]  # decoder-only models echo their prompt
        decoder = self._processor if self._processor is not None else self._tokenizer
        texts = decoder.batch_decode(output.cpu(), skip_special_tokens=True)
        return [normalise_caption(text) for text in texts]


def _check_model_folder(folder: Path) -> None:
    if not folder.exists():
        raise ModelLoadError(f"captioning model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"captioning model path {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a transformers model folder (no config.json)")


def _load_processing(folder: Path) -> tuple[Any, Any, Any]:
    """(processor or None, image processor, tokenizer) for a model folder."""
    import transformers

    try:
        processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        processor = None
        first_error: Exception | None = exc
    else:
        first_error = None
    image_processor = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if image_processor is not None and tokenizer is not None:
        return processor, image_processor, tokenizer
    try:  # folders without a combined processor (e.g. ViT + GPT-2) keep the two parts apart
        image_processor = transformers.AutoImageProcessor.from_pretrained(
            folder, local_files_only=True
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        reason = _one_line(first_error or exc)
        raise ModelLoadError(
            f"cannot load the image processor or tokenizer in {folder}: {reason}"
        ) from None
    return None, image_processor, tokenizer


def _load_model(folder: Path) -> Any:
    """The first auto class that accepts the folder's config; weights must load completely."""
    import transformers

    class_names = (
        "AutoModelForImageTextToText",
        "AutoModelForVision2Seq",
        "BlipForConditionalGeneration",
    )
    classes = [getattr(transformers, name) for name in class_names if hasattr(transformers, name)]
    unsupported: Exception | None = None
    for model_class in classes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, info = model_class.from_pretrained(
                    folder, local_files_only=True, output_loading_info=True
                )
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc):
                unsupported = exc
                continue
            raise ModelLoadError(
                f"cannot load the captioning model in {folder}: {_one_line(exc)}"
            ) from None
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the captioning model in {folder}: {_one_line(exc)}"
            ) from None
        incomplete = sorted(info.get("missing_keys") or []) + [
            str(item[0]) if isinstance(item, tuple) else str(item)
            for item in info.get("mismatched_keys") or []
        ]
        if incomplete:
            raise ModelLoadError(
                f"the weights in {folder} do not fit the model: {len(incomplete)} tensors missing "
                f"or mis-shaped (first: {incomplete[0]})"
            )
        return model
    reason = _one_line(unsupported) if unsupported else "no image-to-text model class available"
    raise ModelLoadError(f"{folder} does not hold an image-to-text model: {reason}")


def _one_line(exc: BaseException | None) -> str:
    text = " ".join(str(exc).split()) if exc is not None else ""
    if not text and exc is not None:
        text = type(exc).__name__
    return text[:300]
