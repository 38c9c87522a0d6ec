"""Generators backed by a local diffusers pipeline (a pipeline folder or a single-file checkpoint).

Nothing is downloaded: pipelines load with ``local_files_only=True`` and never run remote code.
The fingerprint hashes the weight and config FILES (see ``weights_fingerprint``), so a generator's
identity is known without loading it; loading happens on the first ``generate`` or ``load``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resynth_index.errors import ModelLoadError, RsxError
from resynth_index.models.fingerprints import combine, hash_file, hash_json
from resynth_index.models.generators.protocol import GenerationRequest, GenerationSettings

if TYPE_CHECKING:
    import PIL.Image
    import torch

#: Files in a pipeline folder that decide its output: weights, configs, tokenizer vocabularies.
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

_file_digests: dict[tuple[str, int, int], str] = {}


def _cached_hash_file(path: Path) -> str:
    """hash_file, remembered per (path, size, mtime) for this process: big weights hash once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        _file_digests[key] = hash_file(path)
    return _file_digests[key]


def _folder_files(folder: Path) -> list[Path]:
    """Output-deciding files under ``folder`` (hidden files and folders skipped), sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.endswith(FINGERPRINT_SUFFIXES):
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def weights_fingerprint(path: str | Path, config: str | Path | None = None) -> str:
    """Digest of a pipeline's files, without loading anything.

    A folder: every ``*.safetensors``, ``*.bin``, ``*.json``, ``*.txt`` and ``*.model`` file under
    it, each as (relative path, SHA-256 of its bytes), in sorted path order. A single-file
    checkpoint: the file's digest plus the folder fingerprint of its ``config`` folder.
    Raises ModelLoadError for a missing path or a folder that is not a diffusers pipeline.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        _check_pipeline_folder(path)
        files = _folder_files(path)
        entries = [[f.relative_to(path).as_posix(), _cached_hash_file(f)] for f in files]
        return hash_json({"kind": "diffusers-folder", "files": entries})
    if path.is_file():
        _check_single_file(path, config)
        return hash_json(
            {
                "kind": "diffusers-single-file",
                "file": _cached_hash_file(path),
                "config": weights_fingerprint(Path(config)),  # type: ignore[arg-type]
            }
        )
    raise ModelLoadError(f"{path}: no such generator file or folder")


def _check_pipeline_folder(folder: Path) -> None:
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers pipeline folder (it has no model_index.json)"
        )


def _check_single_file(path: Path, config: str | Path | None) -> None:
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: a single-file checkpoint must be .safetensors or .ckpt, "
            "or give a diffusers pipeline folder"
        )
    if config is None:
        raise ModelLoadError(
            f"{path}: --config DIR is required for a single-file checkpoint offline "
            "(a local pipeline folder of the same architecture, with model_index.json)"
        )
    config = Path(config).expanduser()
    if not config.is_dir():
        raise ModelLoadError(f"{config}: the --config folder does not exist")
    _check_pipeline_folder(config)


def _model_index(folder: Path) -> dict[str, Any]:
    """A pipeline folder's model_index.json (its class and components)."""
    import json

    try:
        data = json.loads((folder / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{folder}/model_index.json is unreadable: {_one_line(error)}"
        ) from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{folder}/model_index.json is not a JSON object")
    return data


def _one_line(error: BaseException) -> str:
    """An exception's message squeezed to one short line for a user-facing error."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``torch`` dtype for a settings dtype: "auto" is float16 on CUDA, float32 elsewhere."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def scheduler_class(name: str) -> Any:
    """The diffusers scheduler class called ``name``; RsxError when there is none."""
    import diffusers

    candidate = getattr(diffusers, name, None)
    if (
        not isinstance(candidate, type)
        or not issubclass(candidate, diffusers.SchedulerMixin)
        or not hasattr(candidate, "from_config")
    ):
        raise RsxError(
            f"unknown scheduler {name!r}: give a diffusers scheduler class name such as "
            "DDIMScheduler, EulerDiscreteScheduler or DPMSolverMultistepScheduler"
        )
    return candidate


def generate_images(
    pipe: Any,
    requests: Sequence[GenerationRequest],
    settings: GenerationSettings,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[PIL.Image.Image]:
    """Run a loaded text-to-image pipeline over ``requests`` in batches; images in request order.

    Each image gets its own CPU ``torch.Generator`` seeded with its request's seed, so its
    starting noise (and any scheduler noise) is independent of the batch it lands in.
    """
    import torch

    if batch_size < 1:
        raise RsxError(f"batch size must be at least 1, got {batch_size}")
    images: list[PIL.Image.Image] = []
    for start in range(0, len(requests), batch_size):
        batch = list(requests[start : start + batch_size])
        kwargs: dict[str, Any] = {
            "prompt": [r.caption for r in batch],
            "num_inference_steps": settings.steps,
            "guidance_scale": settings.guidance,
            "width": settings.width,
            "height": settings.height,
            "generator": [torch.Generator("cpu").manual_seed(r.seed) for r in batch],
            "output_type": "pil",
        }
        if settings.negative_prompt is not None:
            kwargs["negative_prompt"] = [settings.negative_prompt] * len(batch)
        with torch.inference_mode():
            made = pipe(**kwargs).images
        if len(made) != len(batch):
            raise RsxError(f"the pipeline returned {len(made)} images for {len(batch)} prompts")
        images.extend(made)
        if progress is not None:
            progress(len(batch))
    return images


class DiffusersGenerator:
    """A candidate generator run from a local diffusers pipeline folder or single-file checkpoint.

    ``fingerprint`` = combine(weights_fingerprint(path[, config]), settings.output_hash()): it
    changes iff the weight/config files or the output-affecting settings change, and is computed
    from the files alone (no load). The pipeline loads lazily and stays loaded.
    """

    can_generate = True

    def __init__(
        self,
        name: str,
        path: str | Path,
        settings: GenerationSettings,
        config: str | Path | None = None,
    ) -> None:
        self.name = name
        self.path = Path(path).expanduser()
        self.config = Path(config).expanduser() if config is not None else None
        self.settings = settings
        if settings.scheduler is not None:
            scheduler_class(settings.scheduler)  # an unknown name fails now, not mid-run
        self.fingerprint = combine(
            weights_fingerprint(self.path, self.config), settings.output_hash()
        )
        self._pipe: Any = None

    def __repr__(self) -> str:
        return f"DiffusersGenerator({self.name!r}, {str(self.path)!r})"

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    @property
    def pipeline(self) -> Any:
        """The loaded diffusers pipeline (loads it on first use)."""
        return self.load()

    def load(self) -> Any:
        """Load the pipeline onto the settings' device and dtype (once); return it."""
        if self._pipe is not None:
            return self._pipe
        from resynth_index.models.devices import resolve_device

        if not self.path.exists():
            raise ModelLoadError(f"{self.path}: no such generator file or folder")
        device = resolve_device(self.settings.device)
        dtype = resolve_dtype(self.settings.dtype, device)
        with warnings.catch_warnings():
            # newer diffusers renamed torch_dtype to dtype; older ones only know torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            if self.path.is_dir():
                pipe = self._load_folder(dtype)
            else:
                pipe = self._load_single_file(dtype)
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
        if self.settings.scheduler is not None:
            cls = scheduler_class(self.settings.scheduler)
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        try:
            pipe = pipe.to(device)
        except Exception as error:  # e.g. out of device memory
            raise ModelLoadError(
                f"{self.path}: cannot move to {device}: {_one_line(error)}"
            ) from error
        self._pipe = pipe
        return pipe

    def _load_folder(self, dtype: Any) -> Any:
        import importlib.util

        from diffusers import AutoPipelineForText2Image, DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        _check_pipeline_folder(self.path)
        diffusers_logging.disable_progress_bar()  # keep stderr for one-line messages
        transformers_logging.disable_progress_bar()
        options: dict[str, Any] = {
            "local_files_only": True,
            "torch_dtype": dtype,
            "trust_remote_code": False,
            # without accelerate, diffusers warns at every load and falls back anyway
            "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None,
        }
        if "safety_checker" in _model_index(self.path):
            options["safety_checker"] = None  # skip loading it: resyntheses must not be censored
        try:
            return AutoPipelineForText2Image.from_pretrained(str(self.path), **options)
        except Exception:  # the auto class refuses pipelines it has no text-to-image mapping for
            pass
        try:
            return DiffusionPipeline.from_pretrained(str(self.path), **options)
        except Exception as error:
            raise ModelLoadError(
                f"{self.path}: cannot load the diffusers pipeline: {_one_line(error)}"
            ) from error

    def _load_single_file(self, dtype: Any) -> Any:
        import diffusers

        _check_single_file(self.path, self.config)
        assert self.config is not None
        class_name = _model_index(self.config).get("_class_name")
        cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
        if cls is None or not hasattr(cls, "from_single_file"):
            raise ModelLoadError(
                f"{self.config}: pipeline class {class_name!r} cannot load single-file checkpoints"
            )
        try:
            # .ckpt files are read by diffusers with torch.load(weights_only=True): tensors only
            return cls.from_single_file(
                str(self.path), config=str(self.config), local_files_only=True, torch_dtype=dtype
            )
        except Exception as error:
            raise ModelLoadError(
                f"{self.path}: cannot load the checkpoint: {_one_line(error)}"
            ) from error

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        batch_size: int = 8,
        progress: Callable[[int], None] | None = None,
    ) -> list[PIL.Image.Image]:
        """Images for ``requests`` in order; see ``generate_images``."""
        if not requests:
            return []
        return generate_images(self.load(), requests, self.settings, batch_size, progress)
