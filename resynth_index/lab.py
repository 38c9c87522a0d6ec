"""The Lab facade: one directory holding the store, the blobs, the vector index and the settings.

Everything the CLI does goes through a ``Lab``: open or create it, register generators, ingest,
query, check. Models load lazily, on first use, so commands that only read the store stay fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from resynth_index.config import DATABASE_FILE, SETTINGS_FILE, LabSettings
from resynth_index.errors import RsxError, StoreError
from resynth_index.store import migrate, repository
from resynth_index.store.blobs import BlobStore
from resynth_index.store.engine import make_engine, make_sessionmaker, sqlite_url
from resynth_index.store.models import GeneratorRow, utcnow

if TYPE_CHECKING:
    from resynth_index.models.embedders import Embedder
    from resynth_index.models.generators.protocol import GenerationSettings, Generator
    from resynth_index.store.vectors import VectorIndex

GENERATOR_KINDS = ("diffusers", "toy", "imported")
IMPORTED_SETTINGS_HASH = "imported"


class Lab:
    """A lab directory opened for work. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, root: Path, settings: LabSettings, device: str | None = None) -> None:
        self.root = root
        self.settings = settings
        self.device = device or settings.device
        self.engine = make_engine(sqlite_url(root / DATABASE_FILE))
        self._sessions = make_sessionmaker(self.engine)
        self.blobs = BlobStore(root / "blobs")
        self._generators: dict[str, Generator] = {}

    # ----------------------------------------------------------------- opening and creating
    @classmethod
    def create(
        cls, root: Path, *, embedder: str = "toy", layer: int | None = None, device: str = "auto"
    ) -> Lab:
        """Make a new lab with its embedder (``toy``, ``local-dir:PATH`` or ``ARCH@WEIGHTS``)."""
        from resynth_index.models.embedders import load_embedder

        root = Path(root)
        if (root / SETTINGS_FILE).exists():
            raise StoreError(f"{root} is already an rsx lab")
        spec = _embedder_spec(root, embedder, layer)
        model = load_embedder(_inside(root, spec), device=device)  # a bad embedder leaves no lab
        for sub in ("blobs", "index", "models"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        settings = LabSettings(
            embedder=spec.to_dict(),
            embedder_label=embedder,
            embedder_fingerprint=model.fingerprint,
            embedder_dim=model.dim,
            device=device,
        )
        lab = cls(root, settings, device=device)
        migrate.upgrade(lab.engine)
        settings.save(root)  # written last: a lab without settings.json is not a lab yet
        lab.__dict__["embedder"] = model
        return lab

    @classmethod
    def open(cls, root: Path, *, device: str | None = None) -> Lab:
        """Open an existing lab, upgrading its schema when it is older than this code."""
        root = Path(root)
        if not root.is_dir():
            raise StoreError(f"no lab at {root}; create one with 'rsx init'")
        settings = LabSettings.load(root)
        lab = cls(root, settings, device=device)
        migrate.ensure_current(lab.engine)
        return lab

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends normally, rolled back otherwise."""
        with self._sessions() as session, session.begin():
            yield session

    # ----------------------------------------------------------------- models and index
    @cached_property
    def embedder(self) -> Embedder:
        """The lab's embedder; refused if its fingerprint is not the one the lab was made with."""
        from resynth_index.models.embedders import EmbedderSpec, load_embedder

        spec = _inside(self.root, EmbedderSpec.from_dict(self.settings.embedder))
        model = load_embedder(spec, device=self.device)
        if model.fingerprint != self.settings.embedder_fingerprint:
            raise StoreError(
                f"the embedder at {spec.weights} is not the one this lab was built with "
                f"(fingerprint {model.fingerprint[:12]}, "
                f"lab {self.settings.embedder_fingerprint[:12]});"
                " vectors from different embedders cannot be compared"
            )
        return model

    @property
    def fingerprint(self) -> str:
        return self.settings.embedder_fingerprint

    @property
    def index_path(self) -> Path:
        return self.root / "index" / f"{self.fingerprint[:16]}.faiss"

    @cached_property
    def index(self) -> VectorIndex:
        """The FAISS index of the lab's embeddings, caught up with (or rebuilt from) the store."""
        from resynth_index.store.vectors import VectorIndex

        with self.session() as session:
            count, max_id = repository.embedding_stats(session, self.fingerprint)
        return VectorIndex.open(
            self.index_path,
            self.fingerprint,
            self.settings.embedder_dim,
            self.embedding_source,
            db_count=count,
            db_max_id=max_id,
        )

    def embedding_source(self, after_id: int):
        """Every stored embedding of the lab's embedder with id > after_id, in batches."""
        with self._sessions() as session:
            yield from repository.iter_embeddings(session, self.fingerprint, after_id)

    def sync_index(self) -> None:
        """Add embeddings stored since the index was last brought up to date, then save it."""
        index = self.index
        added = False
        for ids, vectors in self.embedding_source(index.watermark):
            index.add(ids, vectors)
            added = True
        if added:
            index.save()

    # ----------------------------------------------------------------- generators
    def add_generator(
        self,
        name: str,
        kind: str,
        *,
        source: str | Path | None = None,
        settings: GenerationSettings | None = None,
        resyntheses: int | None = None,
        config: str | Path | None = None,
    ) -> GeneratorRow:
        """Register a candidate generator. Nothing already stored is recomputed."""
        from resynth_index.models.generators.protocol import GenerationSettings

        _check_name(name)
        if kind not in GENERATOR_KINDS:
            raise RsxError(f"unknown generator kind {kind!r}: use {', '.join(GENERATOR_KINDS)}")
        with self.session() as session:
            existing = repository.generator_by_name(session, name)
            if existing is not None:
                state = "retired" if existing.retired_at else "registered"
                raise RsxError(f"a generator named {name!r} is already {state} in this lab")
        resyntheses = resyntheses or self.settings.default_resyntheses
        if resyntheses < 1:
            raise RsxError("--resyntheses must be at least 1")
        record: dict[str, Any] = {"resyntheses": resyntheses}
        if kind == "imported":
            from resynth_index.models.generators.imported import ImportedGenerator

            fingerprint = ImportedGenerator(name).fingerprint
            stored_source = None
        else:
            from resynth_index.models.generators.diffusers import DiffusersGenerator

            settings = settings or GenerationSettings()
            record["generation"] = settings.to_dict()
            if config is not None:
                record["config"] = str(Path(config).resolve())
            stored_source = self._portable_path(Path(source))
            model = DiffusersGenerator(
                name, self._absolute(stored_source), settings, config=record.get("config")
            )
            fingerprint = model.fingerprint  # hashes the weight files; fails early on a bad path
        row = GeneratorRow(
            name=name,
            kind=kind,
            source=stored_source,
            settings_json=json.dumps(record, sort_keys=True),
            fingerprint=fingerprint,
            added_at=utcnow(),
        )
        with self.session() as session:
            session.add(row)
        return row

    def add_toy_generator(
        self,
        name: str,
        seed: int,
        *,
        base_seed: int | None = None,
        perturbation: float = 0.0,
        resyntheses: int | None = None,
    ) -> GeneratorRow:
        """Build a toy pipeline from ``seed``, save it inside the lab, register it."""
        from resynth_index.models.toyzoo.pipelines import TOY_SETTINGS, save_toy_pipeline

        _check_name(name)
        folder = self.root / "models" / f"toy-{name}"
        if not (folder / "model_index.json").exists():
            save_toy_pipeline(folder, seed, base_seed=base_seed, perturbation=perturbation)
        return self.add_generator(
            name, "toy", source=folder, settings=TOY_SETTINGS, resyntheses=resyntheses
        )

    def generators(self, include_retired: bool = False) -> list[GeneratorRow]:
        with self.session() as session:
            query = select(GeneratorRow).order_by(GeneratorRow.name)
            if not include_retired:
                query = query.where(GeneratorRow.retired_at.is_(None))
            return list(session.scalars(query))

    def retire_generator(self, name: str) -> None:
        with self.session() as session:
            row = repository.generator_by_name(session, name)
            if row is None:
                raise RsxError(f"no generator named {name!r} in this lab")
            if row.retired_at is not None:
                raise RsxError(f"generator {name!r} is already retired")
            row.retired_at = utcnow()

    def generator_model(self, row: GeneratorRow) -> Generator:
        """The runnable (or imported) generator behind a registered row, loaded once."""
        if row.name not in self._generators:
            record = json.loads(row.settings_json)
            if row.kind == "imported":
                from resynth_index.models.generators.imported import ImportedGenerator

                model: Generator = ImportedGenerator(row.name)
            else:
                from resynth_index.models.generators.diffusers import DiffusersGenerator
                from resynth_index.models.generators.protocol import GenerationSettings

                settings = GenerationSettings.from_dict(record["generation"])
                if self.device != "auto" and settings.device == "auto":
                    settings = settings.__class__(**{**settings.to_dict(), "device": self.device})
                model = DiffusersGenerator(
                    row.name, self._absolute(row.source), settings, config=record.get("config")
                )
            if model.fingerprint != row.fingerprint:
                raise StoreError(
                    f"generator {row.name!r} no longer matches what was registered (fingerprint "
                    f"{model.fingerprint[:12]}, registered {row.fingerprint[:12]}): its weights or "
                    "settings changed; register the new one under another name"
                )
            self._generators[row.name] = model
        return self._generators[row.name]

    @staticmethod
    def resyntheses_per_caption(row: GeneratorRow) -> int:
        return int(json.loads(row.settings_json).get("resyntheses", 1))

    @staticmethod
    def settings_hash(row: GeneratorRow) -> str:
        if row.kind == "imported":
            return IMPORTED_SETTINGS_HASH
        from resynth_index.models.generators.protocol import GenerationSettings

        record = json.loads(row.settings_json)
        return GenerationSettings.from_dict(record["generation"]).output_hash()

    # ----------------------------------------------------------------- paths
    def _portable_path(self, path: Path) -> str:
        """Paths inside the lab are stored relative to it, so a lab can be moved whole."""
        resolved = path.expanduser().resolve()
        try:
            return str(resolved.relative_to(self.root.resolve()))
        except ValueError:
            return str(resolved)

    def _absolute(self, stored: str | None) -> Path:
        if stored is None:
            raise StoreError("this generator has no model files")
        path = Path(stored)
        return path if path.is_absolute() else self.root / path


def _check_name(name: str) -> None:
    if not name or len(name) > 128 or any(c in name for c in ",/\\\n\t") or name != name.strip():
        raise RsxError(
            f"invalid generator name {name!r}: use up to 128 characters without commas, slashes"
            " or surrounding spaces"
        )


def _inside(root: Path, spec):
    """The spec with a lab-relative local-dir folder made absolute."""
    from resynth_index.models.embedders import EmbedderSpec

    if spec.weights.startswith("local-dir:"):
        folder = Path(spec.weights.removeprefix("local-dir:"))
        if not folder.is_absolute():
            return EmbedderSpec(spec.arch, f"local-dir:{root / folder}", spec.layer)
    return spec


def _embedder_spec(root: Path, embedder: str, layer: int | None):
    """Turn the user's --embedder text into an EmbedderSpec (building the toy model if asked)."""
    from resynth_index.models.embedders import EmbedderSpec

    if embedder == "toy":
        from resynth_index.models.toyzoo.clip import save_toy_clip

        save_toy_clip(root / "models" / "toy-clip")
        return EmbedderSpec(arch="", weights="local-dir:models/toy-clip", layer=layer)
    if embedder.startswith("local-dir:"):
        folder = Path(embedder.removeprefix("local-dir:")).expanduser().resolve()
        return EmbedderSpec(arch="", weights=f"local-dir:{folder}", layer=layer)
    arch, sep, weights = embedder.partition("@")
    if not sep or not arch or not weights:
        raise RsxError(
            f"cannot read --embedder {embedder!r}: use 'toy', 'local-dir:FOLDER' or 'ARCH@WEIGHTS'"
            " (e.g. ViT-L-14-336@/models/vit-l-14-336.safetensors)"
        )
    return EmbedderSpec(arch=arch, weights=str(Path(weights).expanduser().resolve()), layer=layer)
