"""Generators backed by a local diffusers pipeline (a pipeline folder or a single-file checkpoint).

Nothing is downloaded: pipelines load with ``local_files_only=True`` and never run remote code.
The fingerprint hashes the weight and config FILES (see ``weights_fingerprint``), so a generator's
identity is known without loading it; loading happens on the first ``generate`` or ``load``.
Each file's digest is asked of a ``hashing.FileDigests`` the caller passes (a lab lends the one
that remembers digests in its database, so a new process need not re-read unchanged weights),
and kept for this process too, keyed by the file's full ``FileStat``.
``check_pipeline`` validates a folder's structure (model_index.json, the pipeline class, every
component's folder and config) without loading weights; ``rsx generator add`` runs it.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resynth_index.errors import ModelLoadError, RsxError
from resynth_index.hashing import FileDigests, FileStat, HashEveryTime, file_stat
from resynth_index.media.folders import walk_files
from resynth_index.models.fingerprints import combine, hash_json
from resynth_index.models.generators.protocol import (
    GenerationRequest,
    GenerationSettings,
    concrete_dtype,
)

if TYPE_CHECKING:
    import PIL.Image
    import torch

#: Files in a pipeline folder that decide its output: weights, configs, tokenizer vocabularies.
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: Config files a pipeline component folder can hold (models, schedulers, processors, tokenizers).
COMPONENT_CONFIGS = (
    "config.json",
    "scheduler_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
)
#: Weight files a model component loads from (variants and shards end the same way).
COMPONENT_WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: Components rsx never loads (resyntheses must not be censored), so they may be absent.
_SKIPPED_COMPONENTS = frozenset({"safety_checker"})
_WEIGHTLESS_CLASS_WORDS = ("Tokenizer", "Scheduler", "Processor", "FeatureExtractor")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

_file_digests: dict[FileStat, str] = {}
_HASH_EVERY_TIME = HashEveryTime()


def _cached_hash_file(path: Path, digests: FileDigests | None = None) -> str:
    """The file's SHA-256, remembered for this process per ``FileStat`` (real path, device, inode,
    size, mtime, ctime): big weights hash once. A file not seen yet in this process is asked of
    ``digests`` (the lab's memory of digests), else hashed."""
    try:
        key = file_stat(path)
        if key not in _file_digests:
            _file_digests[key] = (digests or _HASH_EVERY_TIME).digest(path)
    except OSError as error:  # a dangling or looping link, a file that cannot be read
        raise ModelLoadError(f"{path}: cannot read: {_one_line(error)}") from error
    return _file_digests[key]


def _folder_files(folder: Path) -> list[Path]:
    """Output-deciding files under ``folder`` (hidden files and folders skipped), sorted.

    Links are followed, each real directory once (``media.folders.walk_files``): a link cycle
    is walked once, and a component linked in from elsewhere is hashed like a copy of it.
    """
    try:
        files = walk_files(folder, skip_hidden=True)
    except OSError as error:
        raise ModelLoadError(f"{folder}: cannot list: {_one_line(error)}") from error
    return [path for path in files if path.name.endswith(FINGERPRINT_SUFFIXES)]


def fingerprint_files(path: str | Path, config: str | Path | None = None) -> list[Path]:
    """The files ``weights_fingerprint`` reads for ``path`` (and ``config``), listed without
    reading them (for a Ray coordinator to say which digests it knows); none that cannot be
    listed."""
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            return _folder_files(path)
    except ModelLoadError:
        return []
    if path.is_file():
        return [path, *(fingerprint_files(config) if config is not None else [])]
    return []


def weights_fingerprint(
    path: str | Path, config: str | Path | None = None, *, digests: FileDigests | None = None
) -> str:
    """Digest of a pipeline's files, without loading anything.

    A folder: every ``*.safetensors``, ``*.bin``, ``*.json``, ``*.txt`` and ``*.model`` file under
    it, each as (relative path, SHA-256 of its bytes), in sorted path order. A single-file
    checkpoint: the file's digest plus the folder fingerprint of its ``config`` folder.
    ``digests`` gives each file's SHA-256 (default: hash it; see ``_cached_hash_file``).
    Raises ModelLoadError for a missing path or a folder that is not a diffusers pipeline.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        _check_pipeline_folder(path)
        files = _folder_files(path)
        entries = [[f.relative_to(path).as_posix(), _cached_hash_file(f, digests)] for f in files]
        return hash_json({"kind": "diffusers-folder", "files": entries})
    if path.is_file():
        _check_single_file(path, config)
        return hash_json(
            {
                "kind": "diffusers-single-file",
                "file": _cached_hash_file(path, digests),
                "config": weights_fingerprint(Path(config), digests=digests),  # type: ignore[arg-type]
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
    """``torch`` dtype for a settings dtype on a concrete device (``protocol.concrete_dtype``)."""
    import torch

    return getattr(torch, concrete_dtype(dtype, device))


# ------------------------------------------------------------------ validating without loading
def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is unreadable: {_one_line(error)}") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def _components(index: dict[str, Any], where: Path) -> dict[str, tuple[str, str] | None]:
    """model_index.json's components: name -> (library, class), or None for an absent one.

    Keys starting with "_" are metadata and plain values (e.g. ``requires_safety_checker``)
    are pipeline options; every two-item list is a component.
    """
    found: dict[str, tuple[str, str] | None] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2:
            raise ModelLoadError(f"{where}: component {name!r} is not [library, class]")
        library, class_name = value
        if library is None and class_name is None:
            found[name] = None
        elif isinstance(library, str) and isinstance(class_name, str):
            found[name] = (library, class_name)
        else:
            raise ModelLoadError(f"{where}: component {name!r} is not [library, class]")
    return found


def _pipeline_class(class_name: Any, where: Path) -> Any:
    """The diffusers pipeline class a model_index.json names, looked up without loading it."""
    import diffusers

    if not isinstance(class_name, str) or not class_name:
        raise ModelLoadError(f"{where} names no pipeline class (_class_name)")
    try:
        cls = getattr(diffusers, class_name, None)
    except Exception as error:  # diffusers' lazy import of that pipeline's module failed
        raise ModelLoadError(
            f"{where}: pipeline class {class_name!r} cannot be imported: {_one_line(error)}"
        ) from error
    if not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline):
        raise ModelLoadError(
            f"{where}: {class_name!r} is not a pipeline class of the installed diffusers "
            f"{diffusers.__version__}"
        )
    if "prompt" not in inspect.signature(cls.__call__).parameters:
        raise ModelLoadError(f"{where}: {class_name} is not a text-to-image pipeline")
    return cls


def _required_components(cls: Any) -> list[str]:
    """The components ``cls.__init__`` needs: parameters without a default, less optional ones."""
    optional = set(getattr(cls, "_optional_components", None) or ())
    required = []
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is parameter.empty and parameter.name not in optional:
            required.append(parameter.name)
    return required


def _check_component(folder: Path, name: str, class_name: str, needs_weights: bool) -> None:
    """A component's folder exists, holds a config, every config parses, weights if needed."""
    component = folder / name
    if not component.is_dir():
        raise ModelLoadError(f"{folder}: component {name!r} has no folder {name}/")
    configs = [component / c for c in COMPONENT_CONFIGS if (component / c).is_file()]
    if not configs:
        raise ModelLoadError(f"{component} holds no config ({', '.join(COMPONENT_CONFIGS)})")
    for config in configs:
        _read_json_object(config)
    weightless = any(word in class_name for word in _WEIGHTLESS_CLASS_WORDS)
    if needs_weights and not weightless and (component / "config.json").is_file():
        try:
            names = [p.name for p in component.iterdir()]
        except OSError as error:
            raise ModelLoadError(f"{component}: cannot list: {_one_line(error)}") from error
        if not any(n.endswith(COMPONENT_WEIGHT_SUFFIXES) for n in names):
            raise ModelLoadError(f"{component} holds no weights (*.safetensors or *.bin)")


def check_pipeline_folder(folder: str | Path, *, needs_weights: bool = True) -> str:
    """Validate a diffusers pipeline folder without loading any weights; its class name.

    model_index.json must parse as an object naming a text-to-image pipeline class the
    installed diffusers knows; every component that pipeline requires must be listed; every
    listed component (but the safety checker, never loaded) needs its folder and a config that
    parses, and a model component its weight files (``needs_weights``; a ``--config`` folder
    for a single-file checkpoint holds configs only). Raises ModelLoadError, one line.
    """
    folder = Path(folder).expanduser()
    _check_pipeline_folder(folder)
    where = folder / "model_index.json"
    index = _read_json_object(where)
    cls = _pipeline_class(index.get("_class_name"), where)
    components = _components(index, where)
    missing = [name for name in _required_components(cls) if name not in components]
    if missing:
        raise ModelLoadError(
            f"{where}: {cls.__name__} needs component(s) {', '.join(missing)}, not listed"
        )
    for name, entry in sorted(components.items()):
        if entry is not None and name not in _SKIPPED_COMPONENTS:
            _check_component(folder, name, entry[1], needs_weights)
    return cls.__name__


def _check_safetensors_header(path: Path) -> None:
    """A .safetensors file starts with an 8-byte length and that many bytes of JSON header."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            total = path.stat().st_size
            if not 2 <= size <= min(_MAX_SAFETENSORS_HEADER, total - 8):
                raise ModelLoadError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(handle.read(size).decode("utf-8"))
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read: {_one_line(error)}") from error
    except ValueError as error:
        raise ModelLoadError(f"{path} is not a safetensors file: {_one_line(error)}") from error
    if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
        raise ModelLoadError(f"{path} is not a safetensors file (no tensors in its header)")


def check_single_file(path: str | Path, config: str | Path | None) -> str:
    """Validate a single-file checkpoint and its ``--config`` folder without loading weights.

    The --config folder passes ``check_pipeline_folder`` (configs only), its class can load
    single files, and a .safetensors checkpoint has a readable header. Returns the class name.
    """
    import diffusers

    path = Path(path).expanduser()
    _check_single_file(path, config)
    assert config is not None
    class_name = check_pipeline_folder(config, needs_weights=False)
    if not hasattr(getattr(diffusers, class_name), "from_single_file"):
        raise ModelLoadError(f"{config}: {class_name} cannot load single-file checkpoints")
    if path.suffix.lower() == ".safetensors":
        _check_safetensors_header(path)
    return class_name


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
    from the files alone (no load). The pipeline loads lazily and stays loaded. ``digests`` gives
    the files' SHA-256s (a lab passes its memory of them; default: hash every file).
    """

    can_generate = True

    def __init__(
        self,
        name: str,
        path: str | Path,
        settings: GenerationSettings,
        config: str | Path | None = None,
        *,
        digests: FileDigests | None = None,
    ) -> None:
        self.name = name
        self.path = Path(path).expanduser()
        self.config = Path(config).expanduser() if config is not None else None
        self.settings = settings
        if settings.scheduler is not None:
            scheduler_class(settings.scheduler)  # an unknown name fails now, not mid-run
        self.fingerprint = combine(
            weights_fingerprint(self.path, self.config, digests=digests), settings.output_hash()
        )
        self._pipe: Any = None

    def __repr__(self) -> str:
        return f"DiffusersGenerator({self.name!r}, {str(self.path)!r})"

    def validate(self, check_load: bool = False) -> None:
        """Refuse (ModelLoadError, one line) what cannot load, before it is registered.

        Checks the files without loading weights (``check_pipeline_folder`` or
        ``check_single_file``); ``check_load`` then loads the pipeline once onto the settings'
        device and lets it go.
        """
        if self.path.is_dir():
            check_pipeline_folder(self.path)
        else:
            check_single_file(self.path, self.config)
        if check_load:
            try:
                self.load()
            finally:
                self._pipe = None

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
