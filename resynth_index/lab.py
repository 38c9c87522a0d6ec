"""The Lab facade: one directory holding the store, the blobs, the vector index and the settings.

Everything the CLI does goes through a ``Lab``: open or create it, register generators, ingest,
query, check. Models load lazily, on first use, so commands that only read the store stay fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from resynth_index.config import (
    DATABASE_FILE,
    QUARANTINE_DIR,
    SETTINGS_FILE,
    LabSettings,
    demo_lab_hint,
)
from resynth_index.errors import RsxError, StoreError
from resynth_index.store import embeddings, migrate, repository
from resynth_index.store.blobs import BlobStore, Quarantine
from resynth_index.store.digests import HeldDigests, StoredDigests
from resynth_index.store.engine import (
    database_url,
    make_engine,
    make_sessionmaker,
    reaching_database,
    sqlite_url,
)
from resynth_index.store.models import GeneratorRow

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image

    from resynth_index.models.embedders import Embedder, EmbedderSpec
    from resynth_index.models.generators.protocol import GenerationSettings, Generator
    from resynth_index.store.vectors import SyncReport, VectorIndex


@dataclass(frozen=True)
class SettingsChange:
    """What ``Lab.set_generator_settings`` changed: both settings records (JSON text), both
    fingerprints, and both settings hashes (the cache key part) on the lab's device."""

    name: str
    kind: str
    old_settings_json: str
    new_settings_json: str
    old_fingerprint: str
    new_fingerprint: str
    old_settings_hash: str
    new_settings_hash: str


class Lab:
    """A lab directory opened for work. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(
        self,
        root: Path,
        settings: LabSettings,
        device: str | None = None,
        *,
        embedder: Embedder | None = None,
        new_database: bool = False,
    ) -> None:
        """A lab over ``root`` (see ``create`` and ``open``). ``embedder``, when given, is an
        embedder already loaded (e.g. shared by another lab); it must be the lab's own.
        ``new_database``: the lab's SQLite file may be created (``rsx init`` alone); otherwise
        a missing one is an error, never a new empty database."""
        self.root = root
        self.settings = settings
        self.device = device or settings.device
        # the lab's own SQLite file, unless settings name a PostgreSQL database
        url = database_url(settings.database_url) if settings.database_url else ""
        self.engine = make_engine(
            url or sqlite_url(root / DATABASE_FILE, existing=not new_database)
        )
        self._sessions = make_sessionmaker(self.engine)
        self.blobs = BlobStore(_blob_root(root, settings.blobs))
        # the digests of files read before (weights, ingested images), kept in the database
        self.file_digests = StoredDigests(self.engine)
        # generator name -> (the registration it was built for, the model)
        self._generators: dict[str, tuple[tuple[str, str, str | None], Generator]] = {}
        self._embedder: Embedder | None = None
        if embedder is not None:
            self._check_embedder(embedder, "the embedder given")
            self._embedder = embedder

    # ----------------------------------------------------------------- opening and creating
    @classmethod
    def create(
        cls,
        root: Path,
        *,
        embedder: str = "toy",
        layer: int | None = None,
        device: str = "auto",
        precision: str = "auto",
        database: str | None = None,
        blobs: Path | None = None,
    ) -> Lab:
        """Make a new lab with its embedder (``toy``, ``local-dir:PATH`` or ``ARCH@WEIGHTS``).

        ``precision`` "auto" is resolved here, for this machine's device (fp16 on CUDA, fp32
        elsewhere), and recorded: the lab opens with it on any machine. ``database``: a
        PostgreSQL URL without a password (default: the lab's own SQLite file); ``blobs``: the
        blob path, possibly shared by several labs (default: ``blobs/`` inside the lab).
        """
        from resynth_index.models.embedders import load_embedder

        root = Path(root)
        if database:
            database_url(database)  # a bad URL is refused before anything is made
        _check_new_lab_folder(root, database=bool(database), blobs=blobs)
        spec = _embedder_spec(root, embedder, layer)
        # a bad embedder leaves no lab; the digests its load makes are the new lab's to keep
        held = HeldDigests()
        model = load_embedder(_inside(root, spec), device=device, precision=precision, digests=held)
        lab = cls.create_with_embedder(
            root, spec, model, label=embedder, device=device, database=database, blobs=blobs
        )
        held.hand_to(lab.file_digests)
        return lab

    @classmethod
    def create_with_embedder(
        cls,
        root: Path,
        spec: EmbedderSpec,
        model: Embedder,
        *,
        label: str | None = None,
        device: str = "auto",
        database: str | None = None,
        blobs: Path | None = None,
    ) -> Lab:
        """Make a new lab around an embedder already loaded from ``spec`` (``create`` parses the
        user's --embedder text and loads it; a library caller holding a model comes here).
        ``label`` is how the embedder was named (default ``ARCH@WEIGHTS``); ``database`` and
        ``blobs`` as for ``create``."""
        root = Path(root)
        _check_new_lab_folder(root, database=bool(database), blobs=blobs)
        url = database_url(database) if database else ""
        blob_path = str(Path(blobs).expanduser().resolve()) if blobs is not None else ""
        try:
            for sub in ("index", "models"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            _blob_root(root, blob_path).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create the lab at {root}: {error.strerror}") from None
        settings = LabSettings(
            embedder=spec.to_dict(),
            embedder_label=label or f"{spec.arch}@{spec.weights}",
            embedder_fingerprint=model.fingerprint,
            embedder_dim=model.dim,
            embedder_precision=model.precision,
            device=device,
            database_url=url,
            blobs=blob_path,
        )
        lab = cls(root, settings, device=device, embedder=model, new_database=True)
        with reaching_database(lab.engine):
            migrate.upgrade(lab.engine)
            # an index from the start: a run killed before its sync then leaves an index that
            # merely lags (a note in `rsx check`), not a missing one (a problem)
            lab.sync_index()
        settings.save(root)  # written last: a lab without settings.json is not a lab yet
        return lab

    @classmethod
    def open(
        cls, root: Path, *, device: str | None = None, embedder: Embedder | None = None
    ) -> Lab:
        """Open an existing lab, upgrading its schema when it is older than this code.

        ``embedder``: the lab's embedder already loaded (by another lab on the same model, say),
        so it is not loaded again; refused when its fingerprint is not the lab's.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} is a file, not a lab folder")
        if not root.is_dir():
            hint = demo_lab_hint(root)
            raise StoreError(
                f"no lab at {root}; create one with 'rsx init'" + (f", {hint}" if hint else "")
            )
        settings = LabSettings.load(root)
        if not settings.database_url:
            _require_database_file(root)
        lab = cls(root, settings, device=device, embedder=embedder)
        try:
            with reaching_database(lab.engine):
                if migrate.current_revision(lab.engine) is None:
                    raise StoreError(_no_schema(root, lab.engine, settings))
                migrate.ensure_current(lab.engine)
        except BaseException:
            lab.close()
            raise
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
    @property
    def embedder(self) -> Embedder:
        """The lab's embedder, loaded on first use (see ``_load_embedder``)."""
        if self._embedder is None:
            self._embedder = self._load_embedder()
        return self._embedder

    def _load_embedder(self) -> Embedder:
        """The lab's embedder; refused if its fingerprint is not the one the lab was made with.

        It runs in the precision recorded at init, whatever this machine's device. A lab made
        before that was recorded used "auto" (fp16 on CUDA, fp32 elsewhere): the other of the
        two is tried when this machine's choice does not match.
        """
        from resynth_index.models.embedders import load_embedder

        spec = self.embedder_spec()
        recorded = self.settings.embedder_precision
        # the lab's memory of digests: unchanged weights need not be hashed again
        digests = self.file_digests
        model = load_embedder(
            spec, device=self.device, precision=recorded or "auto", digests=digests
        )
        if not recorded and model.fingerprint != self.settings.embedder_fingerprint:
            other = "fp16" if model.precision == "fp32" else "fp32"
            retry = load_embedder(spec, device=self.device, precision=other, digests=digests)
            if retry.fingerprint == self.settings.embedder_fingerprint:
                model = retry
        self._check_embedder(model, f"the embedder at {spec.weights}")
        return model

    def embedder_spec(self) -> EmbedderSpec:
        """The lab's embedder spec, a lab-relative folder made absolute (for workers elsewhere)."""
        from resynth_index.models.embedders import EmbedderSpec

        return _inside(self.root, EmbedderSpec.from_dict(self.settings.embedder))

    def adopt_embedder(self, model: Embedder) -> None:
        """Embed with ``model`` from now on (a Ray pool's, say); refused unless its fingerprint
        is the lab's."""
        self._check_embedder(model, "the embedder given")
        self._embedder = model

    def _check_embedder(self, model: Embedder, what: str) -> None:
        if model.fingerprint != self.settings.embedder_fingerprint:
            raise StoreError(
                f"{what} is not the one this lab was built with "
                f"(fingerprint {model.fingerprint[:12]}, "
                f"lab {self.settings.embedder_fingerprint[:12]});"
                " vectors from different embedders cannot be compared"
            )

    @property
    def fingerprint(self) -> str:
        return self.settings.embedder_fingerprint

    @property
    def index_path(self) -> Path:
        return self.root / "index" / f"{self.fingerprint[:16]}.faiss"

    @cached_property
    def index(self) -> VectorIndex:
        """The FAISS index of the lab's embeddings, caught up with (or rebuilt from) the store.

        Opening it reads and hashes the whole file, and may rewrite it: O(N). Syncs and checks
        open it; a query does not (see ``loaded_index``)."""
        from resynth_index.store.vectors import VectorIndex

        return VectorIndex.open(
            self.index_path,
            self.fingerprint,
            self.settings.embedder_dim,
            self.embedding_source,
            stored=self._embedding_feed,
        )

    @cached_property
    def _embedding_feed(self) -> embeddings.EmbeddingFeed:
        return embeddings.EmbeddingFeed(self._sessions, self.fingerprint)

    def embedding_source(self, after_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored embedding of the lab's embedder with id > after_id, in batches."""
        return self._embedding_feed(after_id)

    def loaded_index(self) -> VectorIndex | None:
        """The index if this lab object has opened it already (``rsx serve`` keeps it loaded),
        else None. Never opens it: a query that needs a few vectors must not pay O(N) for them;
        it reads them from the database instead."""
        return self.__dict__.get("index")

    def sync_index(self) -> SyncReport:
        """Add the embeddings stored since the index was last brought up to date, then save it:
        those above its watermark, and those with lower ids that committed late (see
        ``VectorIndex.catch_up``). A missing, unusable or foreign file is rebuilt. Called after
        batches of writes (ingest, resynthesis, ``rsx index sync``, an idle service), never per
        query. Says what changed since the index was opened or last synced."""
        return self.index.sync(self.embedding_source, self._embedding_feed)

    @property
    def quarantine(self) -> Quarantine:
        """Where repairs put blobs no row points at (``<lab>/quarantine``): never deleted but by
        ``rsx check --repair --purge-quarantine``."""
        return Quarantine(self.root / QUARANTINE_DIR)

    def stored_image(self, image_id: int) -> PIL.Image.Image:
        """Decode a stored image from its blob, refusing one whose bytes no longer match the
        hash (StoreError, naming the blob and the repair to run)."""
        from resynth_index.media.images import load_image_bytes

        with self.session() as session:
            sha256 = repository.image_sha256(session, image_id)
        if sha256 is None:
            raise StoreError(f"image {image_id} is not in the store")
        problem = self.blobs.verify(sha256)
        if problem is not None:
            raise StoreError(f"blob {sha256} is {problem}; run 'rsx check --repair'")
        data = self.blobs.read(sha256)
        return load_image_bytes(data, f"blob {sha256[:12]}", self.settings.max_pixels).image

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
        check_load: bool = False,
    ) -> GeneratorRow:
        """Register a candidate generator. Nothing already stored is recomputed.

        A runnable one is validated first (its files, without loading weights; with
        ``check_load`` also one real load): a refused generator leaves nothing registered.
        """
        from resynth_index.models.generators.diffusers import DiffusersGenerator
        from resynth_index.models.generators.factory import (
            GENERATOR_KINDS,
            build_generator,
            settings_record,
        )

        _check_name(name)
        if kind not in GENERATOR_KINDS:
            raise RsxError(f"unknown generator kind {kind!r}: use {', '.join(GENERATOR_KINDS)}")
        with self.session() as session:
            existing = repository.generator_by_name(session, name)
            if existing is not None and existing.retired_at is not None:
                raise RsxError(
                    f"a generator named {name!r} is already retired in this lab; bring it back"
                    f" with 'rsx generator restore {name}'"
                )
            if existing is not None:
                raise RsxError(f"a generator named {name!r} is already registered in this lab")
        resyntheses = resyntheses or self.settings.default_resyntheses
        if resyntheses < 1:
            raise RsxError("--resyntheses must be at least 1")
        stored_source = None
        if kind != "imported":
            if source is None:
                raise RsxError(f"a {kind} generator needs its model files")
            stored_source = self._portable_path(Path(source))
        record = settings_record(kind, resyntheses, settings, config)
        model = build_generator(
            name, kind, self._absolute(stored_source), record, digests=self.file_digests
        )
        fingerprint = model.fingerprint  # hashes the weight files; fails early on a bad path
        if isinstance(model, DiffusersGenerator):
            model.validate(check_load=check_load)
        with self.session() as session:
            return repository.add_generator(
                session,
                name=name,
                kind=kind,
                source=stored_source,
                settings_json=record,
                fingerprint=fingerprint,
            )

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
        from resynth_index.models.toyzoo.pipelines import TOY_SETTINGS, ensure_toy_pipeline

        _check_name(name)
        folder = ensure_toy_pipeline(
            self.root / "models" / f"toy-{name}",
            seed,
            base_seed=base_seed,
            perturbation=perturbation,
        )
        return self.add_generator(
            name, "toy", source=folder, settings=TOY_SETTINGS, resyntheses=resyntheses
        )

    def generators(self, include_retired: bool = False) -> list[GeneratorRow]:
        """The registered generators by name (the active ones unless ``include_retired``)."""
        with self.session() as session:
            return repository.list_generators(session, include_retired=include_retired)

    def generator_records(self, include_retired: bool = False) -> list[dict[str, Any]]:
        """The generators as plain JSON records: what `rsx generator list --json` prints and
        the service's /v1/generators returns."""
        return [
            {
                "name": row.name,
                "kind": row.kind,
                "source": row.source,
                "settings": json.loads(row.settings_json),
                "fingerprint": row.fingerprint,
                "added_at": row.added_at.isoformat(),
                "retired_at": row.retired_at.isoformat() if row.retired_at else None,
                "status": "retired" if row.retired_at else "active",
            }
            for row in self.generators(include_retired=include_retired)
        ]

    def retire_generator(self, name: str) -> None:
        """Stop offering a generator as a candidate; what it made stays in the lab."""
        with self.session() as session:
            row = repository.generator_by_name(session, name)
            if row is None:
                raise RsxError(f"no generator named {name!r} in this lab")
            if row.retired_at is not None:
                raise RsxError(f"generator {name!r} is already retired")
            repository.retire_generator(session, row)

    def restore_generator(self, name: str) -> GeneratorRow:
        """Make a retired generator a candidate again, with everything it made.

        Nothing is loaded here: its files are checked against its fingerprint when it next runs
        (``generator_model``), so a generator whose weights changed meanwhile is refused then.
        """
        with self.session() as session:
            row = repository.generator_by_name(session, name)
            if row is None:
                raise RsxError(f"no generator named {name!r} in this lab")
            if row.retired_at is None:
                raise RsxError(f"generator {name!r} is not retired; nothing to restore")
            repository.restore_generator(session, row)
            return row

    def set_generator_settings(
        self,
        name: str,
        *,
        changes: dict[str, object] | None = None,
        resyntheses: int | None = None,
    ) -> SettingsChange | None:
        """Change a registered generator's settings; None when they are already those.

        ``changes`` are generation settings (``factory.TUNABLE_SETTINGS``); an imported generator
        takes only ``resyntheses``. Everything is checked before the row is written: the values,
        the scheduler's name, and the generator's files against its registered fingerprint (a
        generator whose weights changed is refused: register those under another name). The new
        fingerprint covers the new settings; the change is appended to the record's
        ``settings_history``. New settings give a new settings hash: the resyntheses stored
        under the old one stay in the store, recorded against the old settings, but are not
        reused for the new ones.
        """
        from datetime import datetime, timezone

        from resynth_index.models.generators import factory

        with self.session() as session:
            row = repository.generator_by_name(session, name)
            if row is None:
                raise RsxError(f"no generator named {name!r} in this lab")
        revised = factory.revised_settings_record(
            row.kind, row.settings_json, changes=changes, resyntheses=resyntheses
        )
        if revised is None:
            return None
        source = self._absolute(row.source)
        current = factory.build_generator(
            row.name, row.kind, source, row.settings_json, digests=self.file_digests
        )
        if current.fingerprint != row.fingerprint:
            raise StoreError(
                f"generator {name!r} no longer matches what was registered (fingerprint "
                f"{current.fingerprint[:12]}, registered {row.fingerprint[:12]}): its files "
                "changed; register the new one under another name"
            )
        fingerprint = factory.build_generator(
            row.name, row.kind, source, revised, digests=self.file_digests
        ).fingerprint
        record = factory.with_settings_change(
            row.settings_json,
            revised,
            old_fingerprint=row.fingerprint,
            new_fingerprint=fingerprint,
            at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        with self.session() as session:
            written = repository.update_generator_settings(
                session,
                row.id,
                expected_settings_json=row.settings_json,
                expected_fingerprint=row.fingerprint,
                settings_json=record,
                fingerprint=fingerprint,
            )
            if not written:
                raise StoreError(
                    f"generator {name!r} was changed by another command meanwhile; nothing was"
                    " written: look at 'rsx generator list' and run this again"
                )
        self._generators.pop(name, None)
        return SettingsChange(
            name=name,
            kind=row.kind,
            old_settings_json=row.settings_json,
            new_settings_json=record,
            old_fingerprint=row.fingerprint,
            new_fingerprint=fingerprint,
            old_settings_hash=factory.settings_hash(row.kind, row.settings_json, self.device),
            new_settings_hash=factory.settings_hash(row.kind, record, self.device),
        )

    def generator_model(self, row: GeneratorRow) -> Generator:
        """The runnable (or imported) generator behind a registered row, loaded once per
        registration: a row whose fingerprint, settings or files changed since (``rsx generator
        set`` run by another process while this one serves) gets a model built afresh, so the
        images made are always those of the settings they are stored under."""
        from resynth_index.models.generators.factory import build_generator

        registration = (row.fingerprint, row.settings_json, row.source)
        held = self._generators.get(row.name)
        if held is None or held[0] != registration:
            model = build_generator(
                row.name,
                row.kind,
                self._absolute(row.source),
                row.settings_json,
                self.device,
                digests=self.file_digests,
            )
            if model.fingerprint != row.fingerprint:
                raise StoreError(
                    f"generator {row.name!r} no longer matches what was registered (fingerprint "
                    f"{model.fingerprint[:12]}, registered {row.fingerprint[:12]}): its weights or "
                    "settings changed; register the new one under another name"
                )
            self._generators[row.name] = (registration, model)
            return model
        return held[1]

    # ----------------------------------------------------------------- paths
    def _portable_path(self, path: Path) -> str:
        """Paths inside the lab are stored relative to it, so a lab can be moved whole."""
        resolved = path.expanduser().resolve()
        try:
            return str(resolved.relative_to(self.root.resolve()))
        except ValueError:
            return str(resolved)

    def _absolute(self, stored: str | None) -> Path | None:
        """A stored path made absolute (lab-relative ones against the lab); None stays None."""
        if stored is None:
            return None
        path = Path(stored)
        return path if path.is_absolute() else self.root / path


def _check_new_lab_folder(root: Path, *, database: bool, blobs: Path | None) -> None:
    """Refuse to make a lab where one cannot be made, or where an earlier lab's evidence lies:
    a lab already (settings.json), a file on the way, a database file or blobs without settings
    (a lab whose settings.json was lost must be restored, not overwritten by a new one)."""
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                raise StoreError(f"cannot create a lab at {root}: {folder} is a file")
            break
    if (root / SETTINGS_FILE).exists():
        raise StoreError(f"{root} is already an rsx lab")
    leftovers = []
    database_file = root / DATABASE_FILE
    if not database and database_file.is_file() and database_file.stat().st_size > 0:
        leftovers.append(DATABASE_FILE)
    if blobs is None and _holds_files(root / "blobs"):
        leftovers.append("blobs/")
    if leftovers:
        raise StoreError(
            f"{root} holds an earlier lab's {' and '.join(leftovers)} but no {SETTINGS_FILE}:"
            f" restore its {SETTINGS_FILE} from a backup to open it, or make the new lab in"
            " another folder"
        )


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` holds any file at any depth (stops at the first)."""
    if not folder.is_dir():
        return False
    return any(names for _here, _subdirs, names in os.walk(folder))


def _require_database_file(root: Path) -> None:
    """Refuse a lab whose SQLite file is missing or empty: its settings, blobs and index are
    the evidence that a database was there; a new empty one would make them all orphans."""
    path = root / DATABASE_FILE
    wal = root / f"{DATABASE_FILE}-wal"
    if path.is_file() and (path.stat().st_size > 0 or (wal.is_file() and wal.stat().st_size)):
        return
    state = "is missing" if not path.exists() else "is empty"
    raise StoreError(
        f"the lab's database {path} {state}, while its {_what_remains(root)} remain:"
        f" restore {DATABASE_FILE} from a backup (rsx never makes a new database for an"
        " existing lab; 'rsx init' makes a new lab in another folder)"
    )


def _no_schema(root: Path, engine: Any, settings: LabSettings) -> str:
    """Why a lab whose database holds no rsx schema is refused, and how to restore it."""
    from resynth_index.store.engine import database_name

    where = database_name(engine)
    fix = (
        f"check the database URL in {root / SETTINGS_FILE} (a typo names another database)"
        " or restore the database from a backup"
        if settings.database_url
        else f"restore {DATABASE_FILE} from a backup"
    )
    return (
        f"the lab's database {where} holds no rsx lab (no schema), while its"
        f" {_what_remains(root)} remain: {fix}; only 'rsx init' creates a lab's schema"
    )


def _what_remains(root: Path) -> str:
    """What of a lab is still there, for the messages above: "settings, blobs and index"."""
    found = ["settings"]
    found += [what for what in ("blobs", "index") if _holds_files(root / what)]
    return found[0] if len(found) == 1 else f"{', '.join(found[:-1])} and {found[-1]}"


def _blob_root(root: Path, recorded: str) -> Path:
    """The lab's blob path: the one its settings record (relative: to the lab), else blobs/."""
    if not recorded:
        return root / "blobs"
    path = Path(recorded).expanduser()
    return path if path.is_absolute() else root / path


def _check_name(name: str) -> None:
    if not name or len(name) > 128 or any(c in name for c in ",/\\\n\t") or name != name.strip():
        raise RsxError(
            f"invalid generator name {name!r}: use up to 128 characters without commas, slashes"
            " or surrounding spaces"
        )


def _inside(root: Path, spec: EmbedderSpec) -> EmbedderSpec:
    """The spec with a lab-relative local-dir folder made absolute (the root too: a relative
    ``--lab`` means nothing to a worker process started elsewhere)."""
    from resynth_index.models.embedders import EmbedderSpec

    if spec.weights.startswith("local-dir:"):
        folder = Path(spec.weights.removeprefix("local-dir:"))
        if not folder.is_absolute():
            absolute = os.path.abspath(root / folder)
            return EmbedderSpec(spec.arch, f"local-dir:{absolute}", spec.layer)
    return spec


def _embedder_spec(root: Path, embedder: str, layer: int | None) -> EmbedderSpec:
    """Turn the user's --embedder text into an EmbedderSpec (building the toy model if asked)."""
    from resynth_index.models.embedders import EmbedderSpec

    if embedder == "toy":
        from resynth_index.models.toyzoo.clip import install_toy_clip

        return install_toy_clip(root, layer)
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
