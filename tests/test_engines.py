"""The same lab on both engines: SQLite (the default) and PostgreSQL (``rsx init --database``).

Every test taking ``engine_lab`` or ``engine_url`` runs once per engine (tests/postgres.py starts
a throwaway PostgreSQL server, or skips the PostgreSQL half where none can run). They cover the
migrations, idempotent writes by concurrent writers, ingest, query and its cache, ``rsx check``,
processes racing on one lab, and the vector index's catch-up when rows commit out of id order.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from hostile_files import (
    file_sha,
    good_images,
    index_problems,
    rsx,
    store_state,
)
from postgres import wait_until
from sqlalchemy import Engine, insert, text
from sqlalchemy.orm import Session

from resynth_index.config import DATABASE_FILE, LabSettings
from resynth_index.lab import Lab
from resynth_index.store import embeddings, migrate, repository
from resynth_index.store.engine import make_engine
from resynth_index.store.models import Base, EmbeddingRow, utcnow

pytestmark = pytest.mark.slow  # every test runs on SQLite and on a throwaway PostgreSQL server

FIRST = "0001_initial"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
CAPTION = "a lighthouse on a cliff at dusk"
TABLES = ("generators", "captions", "images", "resyntheses", "references", "embeddings")


# --------------------------------------------------------------------------- migrations
def _fill_first_revision(engine: Engine) -> None:
    """Rows written the way code at revision 0001 would have written them (portable SQL)."""
    c, d, e, f = ("c" * 64, "d" * 64, "e" * 64, "f" * 64)
    statements = [
        (
            "INSERT INTO generators (id, name, kind, source, settings_json, fingerprint, added_at)"
            " VALUES (1, 'sd15', 'diffusers', '/models/sd15', '{}', :fp, :now)",
            {"fp": "a" * 64},
        ),
        ("INSERT INTO captions (hash, text, created_at) VALUES (:c, 'a cat', :now)", {"c": c}),
        (
            "INSERT INTO images (id, sha256, blob_path, size_bytes, format, width, height,"
            " created_at) VALUES (1, :d, :dp, 10, 'PNG', 8, 8, :now),"
            " (2, :e, :ep, 11, 'PNG', 8, 8, :now)",
            {"d": d, "dp": f"dd/dd/{d}", "e": e, "ep": f"ee/ee/{e}"},
        ),
        (
            "INSERT INTO resyntheses (id, image_id, generator_id, caption_hash, seed,"
            " settings_hash, created_at) VALUES (1, 2, 1, :c, 0, :f, :now)",
            {"c": c, "f": f},
        ),
        (
            'INSERT INTO "references" (id, image_id, generator_id, caption_hash, created_at)'
            " VALUES (1, 1, 1, :c, :now)",
            {"c": c},
        ),
        (
            "INSERT INTO embeddings (id, image_id, embedder_fingerprint, dim, vector, created_at)"
            " VALUES (1, 1, :fp, 2, :vector, :now)",
            {"fp": "b" * 64, "vector": bytes.fromhex("0000803f00000000")},
        ),
    ]
    with engine.begin() as connection:
        for sql, params in statements:
            connection.execute(text(sql), {**params, "now": NOW})


def _rows(engine: Engine) -> dict[str, list[tuple]]:
    """Every row of the first revision's tables, in id order (timestamps as given)."""
    with engine.connect() as connection:
        return {
            table: [tuple(row) for row in connection.execute(text(f'SELECT * FROM "{table}"'))]
            for table in TABLES
        }


def test_migrations_keep_rows_step_down_and_match_the_models(engine_url: str) -> None:
    engine = make_engine(engine_url)
    try:
        migrate.upgrade(engine, FIRST)
        assert migrate.current_revision(engine) == FIRST
        _fill_first_revision(engine)
        before = _rows(engine)

        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision(engine)
        assert _rows(engine) == before
        with engine.connect() as connection:
            vector = connection.execute(text("SELECT vector FROM embeddings")).scalar_one()
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert bytes(vector) == bytes.fromhex("0000803f00000000")
        assert differences == []

        scripts = ScriptDirectory.from_config(migrate.alembic_config(engine))
        while (current := migrate.current_revision(engine)) != FIRST:  # one step at a time
            migrate.downgrade(engine, "-1")
            step = scripts.get_revision(current)
            assert step is not None
            assert migrate.current_revision(engine) == step.down_revision
            assert _rows(engine) == before
        migrate.upgrade(engine)
        assert _rows(engine) == before
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- store writes
def _blocked_on_a_lock(lab: Lab) -> bool:
    """Whether another session of this database waits for a lock (PostgreSQL only)."""
    with lab.engine.connect() as connection:
        waiting = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
        ).scalar_one()
    return bool(waiting)


def _write_everything(session: Session, lab: Lab, generator_id: int) -> tuple[bool, ...]:
    """One writer's image, caption, resynthesis and embedding; what each call says it added."""
    sha = "9" * 64
    image_id, image_added = repository.ensure_image(
        session,
        sha256=sha,
        blob_path=f"99/99/{sha}",
        size_bytes=10,
        fmt="PNG",
        width=8,
        height=8,
    )
    repository.ensure_caption(session, "8" * 64, "a shared caption")
    resynthesis_added = repository.ensure_resynthesis(
        session,
        image_id=image_id,
        generator_id=generator_id,
        caption_hash="8" * 64,
        seed=0,
        settings_hash="7" * 64,
    )
    vector = np.ones((1, lab.settings.embedder_dim), dtype=np.float32)
    embeddings.add_embeddings(session, lab.fingerprint, [image_id], vector)
    return image_added, resynthesis_added


def test_two_writers_storing_the_same_rows_leave_one_of_each(engine_lab: Path) -> None:
    """The second writer starts while the first holds its rows uncommitted; on PostgreSQL it
    is seen waiting on the first's lock before the first commits."""
    with Lab.open(engine_lab) as lab:
        generator_id = next(g.id for g in lab.generators() if g.name == "toy-a")
        first = Session(lab.engine)
        first.begin()
        first_said = _write_everything(first, lab, generator_id)
        started = threading.Event()
        second_said: list[tuple[bool, ...]] = []
        errors: list[BaseException] = []

        def second_writer() -> None:
            try:
                started.set()
                with lab.session() as session:
                    second_said.append(_write_everything(session, lab, generator_id))
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        thread = threading.Thread(target=second_writer)
        thread.start()
        wait_until(started.is_set, what="the second writer to start")
        if lab.engine.dialect.name == "postgresql":
            wait_until(lambda: _blocked_on_a_lock(lab), what="the second writer to wait")
        first.commit()
        first.close()
        thread.join(timeout=120)
        assert not thread.is_alive() and errors == []
        assert first_said == (True, True) and second_said == [(False, False)]
        with lab.session() as session:
            counts = {
                table: session.execute(text(f'SELECT count(*) FROM "{table}"')).scalar_one()
                for table in ("images", "captions", "resyntheses", "embeddings")
            }
        assert counts == {"images": 1, "captions": 1, "resyntheses": 1, "embeddings": 1}


# --------------------------------------------------------------------------- the watermark trap
def _two_images(lab: Lab) -> tuple[int, int]:
    with lab.session() as session:
        ids = []
        for digit in "12":
            sha = digit * 64
            image_id, _ = repository.ensure_image(
                session, sha256=sha, blob_path=f"{digit * 2}/{digit * 2}/{sha}",
                size_bytes=1, fmt="PNG", width=1, height=1,
            )  # fmt: skip
            ids.append(image_id)
    return ids[0], ids[1]


def _embedding_values(lab: Lab, image_id: int, vector: np.ndarray, **extra: int) -> dict:
    return {
        "image_id": image_id,
        "embedder_fingerprint": lab.fingerprint,
        "dim": len(vector),
        "vector": embeddings.vector_to_blob(vector),
        "created_at": utcnow(),
        **extra,
    }


def test_a_lower_id_committed_after_a_higher_one_still_reaches_the_index(
    engine_lab: Path,
) -> None:
    """On PostgreSQL two real transactions: A takes the lower id and commits last. SQLite
    serialises its writers, so there the same order of visibility is staged with explicit ids.
    The index is synced in between (it holds B, its watermark is B's id), then A commits:
    a fresh open and the running lab's next sync both add A."""
    dim = LabSettings.load(engine_lab).embedder_dim
    rng = np.random.default_rng(7)
    vector_a, vector_b = rng.standard_normal((2, dim)).astype(np.float32)
    with Lab.open(engine_lab) as lab:
        image_a, image_b = _two_images(lab)
        lab.sync_index()
        late = Session(lab.engine)
        if lab.engine.dialect.name == "postgresql":
            late.begin()
            late.execute(insert(EmbeddingRow).values(**_embedding_values(lab, image_a, vector_a)))
            id_a = embeddings.embedding_ids(late, [image_a], lab.fingerprint)[image_a]
            with lab.session() as session:  # B: a higher id, committed first
                session.execute(
                    insert(EmbeddingRow).values(**_embedding_values(lab, image_b, vector_b))
                )
                id_b = embeddings.embedding_ids(session, [image_b], lab.fingerprint)[image_b]
        else:
            id_a, id_b = 41, 42
            with lab.session() as session:
                session.execute(
                    insert(EmbeddingRow).values(
                        **_embedding_values(lab, image_b, vector_b, id=id_b)
                    )
                )
            late.begin()
            late.execute(
                insert(EmbeddingRow).values(**_embedding_values(lab, image_a, vector_a, id=id_a))
            )
        assert id_a < id_b

        lab.sync_index()
        assert lab.index.count == 1 and lab.index.watermark == id_b
        late.commit()
        late.close()

        with Lab.open(engine_lab) as other:  # another process: opens the file saved with B
            assert other.index.count == 2
            np.testing.assert_array_equal(other.index.vectors_for([id_a]), [vector_a])
        lab.sync_index()  # the running lab catches up too
        assert lab.index.count == 2 and lab.index.watermark == id_b
        np.testing.assert_array_equal(
            lab.index.vectors_for([id_a, id_b]), np.stack([vector_a, vector_b])
        )
    assert index_problems(engine_lab) == []


class FakeStore:
    """The database side of catch-up without a database: rows by id, every question recorded.

    ``visible`` ids are committed; the others are stored but not yet visible (in flight)."""

    def __init__(self, ids: list[int], dim: int = 4) -> None:
        self.vectors = {
            i: np.random.default_rng(i).standard_normal(dim).astype(np.float32) for i in ids
        }
        self.visible = set(ids)
        self.asked: list[tuple[str, int, int]] = []

    def __call__(self, after_id: int):
        rows = sorted(i for i in self.visible if i > after_id)
        if rows:
            yield np.array(rows, dtype=np.int64), np.stack([self.vectors[i] for i in rows])

    def count(self, lower: int, upper: int) -> int:
        self.asked.append(("count", lower, upper))
        return sum(lower < i <= upper for i in self.visible)

    def ids(self, lower: int, upper: int) -> np.ndarray:
        self.asked.append(("ids", lower, upper))
        return np.array([i for i in self.visible if lower < i <= upper], dtype=np.int64)

    def fetch(self, ids: np.ndarray):
        rows = sorted(int(i) for i in ids if int(i) in self.visible)
        if rows:
            yield np.array(rows, dtype=np.int64), np.stack([self.vectors[i] for i in rows])


def _index_ids(index) -> list[int]:
    return sorted(int(i) for i in index._sorted_ids())


def test_catch_up_finds_late_rows_near_the_top_without_reading_every_id(tmp_path: Path) -> None:
    from resynth_index.store.vectors import VectorIndex

    store = FakeStore(list(range(1, 5001)))
    store.visible -= {4990, 4995}  # in flight while 4991..5000 commit
    index = VectorIndex(tmp_path / "i.faiss", "f" * 64, 4)
    assert index.catch_up(store, store) is True and index.count == 4998
    assert store.asked == [("count", -1, 5000)]  # one count: nothing else to look for

    store.visible |= {4990, 4995}
    store.asked.clear()
    assert index.catch_up(store, store) is True
    assert _index_ids(index) == list(range(1, 5001)) and index.watermark == 5000
    bound = 5000 - 1024 - 2  # the newest 1,024 ids held are compared, no more
    assert store.asked == [("count", -1, 5000), ("count", bound, 5000), ("ids", bound, 5000)]
    np.testing.assert_array_equal(index.vectors_for([4990]), [store.vectors[4990]])

    store.asked.clear()
    assert index.catch_up(store, store) is False and store.asked == [("count", -1, 5000)]


def test_catch_up_widens_to_every_id_for_a_row_far_below_and_rebuilds_after_deletes(
    tmp_path: Path,
) -> None:
    from resynth_index.store.vectors import VectorIndex

    store = FakeStore(list(range(1, 3001)))
    store.visible.discard(7)  # a long transaction: its row is far below the newest
    index = VectorIndex(tmp_path / "i.faiss", "f" * 64, 4)
    index.catch_up(store, store)
    store.visible.add(7)
    assert index.catch_up(store, store) is True
    assert _index_ids(index) == list(range(1, 3001))
    assert store.asked[-1] == ("ids", -1, 3000)  # the windows disagreed: every id compared

    path = tmp_path / "saved.faiss"  # ids out of order survive a save and a load
    index.path = path
    index.save()
    reopened = VectorIndex.open(path, "f" * 64, 4, store, stored=store)
    assert reopened.count == 3000 and _index_ids(reopened) == list(range(1, 3001))

    store.visible -= {10, 11}  # rows deleted (rsx never does): the index starts again
    assert index.catch_up(store, store) is True
    assert _index_ids(index) == sorted(store.visible)


# --------------------------------------------------------------------------- through the CLI
def _toy_image(lab_dir: Path, folder: Path, generator: str, caption: str, seed: int) -> Path:
    """An image made by one of the lab's toy generators, at a seed resyntheses never use."""
    from resynth_index.models.generators.protocol import GenerationRequest

    with Lab.open(lab_dir) as lab:
        row = next(r for r in lab.generators() if r.name == generator)
        image = lab.generator_model(row).generate([GenerationRequest(caption, seed)])[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{generator}-{seed}.png"
    image.save(path)
    return path


@pytest.mark.slow
def test_ingest_is_idempotent(engine_lab: Path, tmp_path: Path) -> None:
    images = good_images(tmp_path / "in", 3, seed=10)
    first = rsx(engine_lab, "ingest", str(tmp_path / "in"))
    assert first.exit_code == 0 and "3 added, 0 skipped" in first.output, first.output
    again = rsx(engine_lab, "ingest", str(tmp_path / "in"))
    assert again.exit_code == 0 and "0 added, 3 skipped" in again.output, again.output
    state = store_state(engine_lab)
    assert state.images == state.blobs == {file_sha(p) for p in images}
    assert state.embeddings == state.embedded_images == 3
    assert index_problems(engine_lab) == []


@pytest.mark.slow
def test_query_names_the_source_and_the_second_generates_nothing(
    engine_lab: Path, tmp_path: Path
) -> None:
    image = _toy_image(engine_lab, tmp_path / "q", "toy-b", CAPTION, seed=1000)

    def query() -> dict:
        result = rsx(engine_lab, "query", str(image), "--caption", CAPTION, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    first = query()
    assert first["verdict"] == "toy-b"
    assert first["generated"] == 3 and first["reused"] == 0
    again = query()
    assert again["generated"] == 0 and again["reused"] == 3
    assert again["ranking"] == first["ranking"]
    assert store_state(engine_lab).queries == 2
    # queries never write the index: it holds what rsx init made it (nothing) and lags
    lagging = index_problems(engine_lab)
    assert lagging and lagging[0] == "index holds 0 vectors, database 4", lagging
    synced = rsx(engine_lab, "index", "sync")
    assert synced.exit_code == 0, synced.output
    assert index_problems(engine_lab) == []


@pytest.mark.slow
def test_check_passes_a_clean_lab_and_finds_an_orphan(engine_lab: Path, tmp_path: Path) -> None:
    good_images(tmp_path / "in", 9, seed=20)  # one orphan among ten blobs: a repair moves it
    assert rsx(engine_lab, "ingest", str(tmp_path / "in")).exit_code == 0
    clean = rsx(engine_lab, "check")
    assert clean.exit_code == 0, clean.output
    data = b"bytes no row points at"
    sha = file_sha_of(data)
    with Lab.open(engine_lab) as lab:
        lab.blobs.put(sha, data)
    found = rsx(engine_lab, "check")
    assert found.exit_code == 1 and f"blob {sha}: not referenced" in found.output, found.output
    assert rsx(engine_lab, "check", "--repair").exit_code == 0
    assert rsx(engine_lab, "check").exit_code == 0


def file_sha_of(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- rsx init
def test_init_records_the_database_and_the_blob_path(
    engine_name: str, engine_url: str, tmp_path: Path
) -> None:
    lab_dir, shared = tmp_path / "lab", tmp_path / "shared" / "blobs"
    database = ["--database", engine_url] if engine_name == "postgresql" else []
    made = rsx(lab_dir, "init", *database, "--blobs", str(shared))
    assert made.exit_code == 0, made.output
    settings = LabSettings.load(lab_dir)
    assert settings.blobs == str(shared.resolve())
    assert settings.database_url == (engine_url if engine_name == "postgresql" else "")
    [image] = good_images(tmp_path / "in", 1, seed=5)
    assert rsx(lab_dir, "ingest", str(image)).exit_code == 0
    with Lab.open(lab_dir) as lab:
        assert lab.engine.dialect.name == engine_name
        assert lab.blobs.root == shared.resolve()
        assert lab.blobs.path_for(file_sha(image)).is_file()
    assert not (lab_dir / "blobs").exists()
    assert (lab_dir / DATABASE_FILE).exists() == (engine_name == "sqlite")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://rsx:s3cret@db.lan:5432/rsx", "PGPASSWORD or ~/.pgpass"),
        ("postgresql+psycopg://rsx@db.lan/rsx?password=s3cret", "PGPASSWORD or ~/.pgpass"),
        ("mysql://rsx@db.lan/rsx", "unsupported database 'mysql'"),
        ("postgresql://rsx@db.lan:5432/", "names no database"),
        ("not a url", "cannot read the database URL"),
    ],
)
def test_init_refuses_a_bad_database_url_before_making_anything(
    tmp_path: Path, url: str, says: str
) -> None:
    result = rsx(tmp_path / "lab", "init", "--database", url)
    assert result.exit_code == 1 and says in result.output, result.output
    assert "s3cret" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "lab").exists()


def test_an_unreachable_server_is_one_line_and_no_lab(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql+psycopg://rsx@127.0.0.1:{port}/rsx"
    result = rsx(tmp_path / "lab", "init", "--database", url)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: the lab's database {url} could not be reached (")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "lab" / "settings.json").exists()


def test_a_missing_service_skips_or_fails_when_services_are_required(monkeypatch) -> None:
    from postgres import PG_BIN_ENV, postgres_missing
    from services import REQUIRE_ENV, require_service

    monkeypatch.setenv(PG_BIN_ENV, "/nonexistent/postgresql/bin")
    reason = postgres_missing()
    assert reason is not None and "install Debian's 'postgresql' package" in reason
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="postgresql is not available"):
        require_service("postgresql", False, reason)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="RSX_REQUIRE_SERVICES=1"):
        require_service("postgresql", False, reason)
    require_service("postgresql", True, "")  # present: nothing happens


def test_the_password_comes_from_libpq_never_the_url(
    postgres_server, tmp_path: Path, monkeypatch
) -> None:
    """A role that must give a password: init fails in one line without PGPASSWORD, works with
    it, and the password is written nowhere in the lab."""
    role, password = "rsx_with_password", "s3cret-pw"
    postgres_server.require_password(role, password)
    database = postgres_server.create_database()
    with postgres_server.connect() as connection:
        connection.execute(f"ALTER DATABASE {database} OWNER TO {role}")
    url = f"postgresql+psycopg://{role}@127.0.0.1:{postgres_server.port}/{database}"
    lab_dir = tmp_path / "lab"
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("PGPASSFILE", raising=False)

    refused = rsx(lab_dir, "init", "--database", url)
    assert refused.exit_code == 1 and "refused this lab" in refused.output
    assert "credentials (PGPASSWORD, ~/.pgpass)" in refused.output
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    assert not (lab_dir / "settings.json").exists()

    monkeypatch.setenv("PGPASSWORD", password)
    made = rsx(lab_dir, "init", "--database", url)
    assert made.exit_code == 0, made.output
    assert LabSettings.load(lab_dir).database_url == url
    assert password not in (lab_dir / "settings.json").read_text()
    with Lab.open(lab_dir) as lab:
        assert lab.generators() == []
    postgres_server.drop_database(database)


def test_a_database_reached_through_its_unix_socket(postgres_server, tmp_path: Path) -> None:
    """A socket folder goes in the URL %-escaped (host=%2Ftmp%2F...): the migrations' config
    must not read those '%' as its own interpolation."""
    from urllib.parse import quote

    database = postgres_server.create_database()
    url = (
        f"postgresql+psycopg://{postgres_server.user}@/{database}"
        f"?host={quote(str(postgres_server.base), safe='')}&port={postgres_server.port}"
    )
    made = rsx(tmp_path / "lab", "init", "--database", url)
    assert made.exit_code == 0, made.output
    with Lab.open(tmp_path / "lab") as lab:
        assert migrate.current_revision(lab.engine) == migrate.head_revision(lab.engine)
    postgres_server.drop_database(database)
