"""The schema evolves by Alembic migrations; old labs upgrade with every row intact."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from resynth_index.config import DATABASE_FILE, LabSettings
from resynth_index.store import migrate
from resynth_index.store.engine import make_engine, sqlite_url
from resynth_index.store.models import Base

FIRST = "0001_initial"
NOW = "2026-01-01 00:00:00"


def _fill_first_revision(db: Path) -> None:
    """Rows written the way code at revision 0001 would have written them (raw SQL)."""
    with sqlite3.connect(db) as connection:
        connection.executescript(
            f"""
            INSERT INTO generators (id, name, kind, source, settings_json, fingerprint, added_at)
              VALUES (1, 'sd15', 'diffusers', '/models/sd15', '{{}}', '{"a" * 64}', '{NOW}');
            INSERT INTO captions (hash, text, created_at) VALUES ('{"c" * 64}', 'a cat', '{NOW}');
            INSERT INTO images
              (id, sha256, blob_path, size_bytes, format, width, height, created_at)
              VALUES (1, '{"d" * 64}', 'dd/dd/{"d" * 64}', 10, 'PNG', 8, 8, '{NOW}'),
                     (2, '{"e" * 64}', 'ee/ee/{"e" * 64}', 11, 'PNG', 8, 8, '{NOW}');
            INSERT INTO resyntheses (id, image_id, generator_id, caption_hash, seed, settings_hash,
                                     created_at)
              VALUES (1, 2, 1, '{"c" * 64}', 0, '{"f" * 64}', '{NOW}');
            INSERT INTO "references" (id, image_id, generator_id, caption_hash, created_at)
              VALUES (1, 1, 1, '{"c" * 64}', '{NOW}');
            INSERT INTO embeddings (id, image_id, embedder_fingerprint, dim, vector, created_at)
              VALUES (1, 1, '{"b" * 64}', 2, x'0000803f00000000', '{NOW}');
            """
        )


def _counts(db: Path) -> dict[str, int]:
    tables = ["generators", "captions", "images", "resyntheses", '"references"', "embeddings"]
    with sqlite3.connect(db) as connection:
        return {t: connection.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}


def test_upgrade_keeps_rows_and_downgrade_upgrade_round_trips(tmp_path: Path) -> None:
    db = tmp_path / "lab.sqlite"
    engine = make_engine(sqlite_url(db))
    migrate.upgrade(engine, FIRST)
    assert migrate.current_revision(engine) == FIRST
    _fill_first_revision(db)
    before = _counts(db)

    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision(engine)
    assert _counts(db) == before
    with sqlite3.connect(db) as connection:
        vector = connection.execute("SELECT vector FROM embeddings WHERE id = 1").fetchone()[0]
        assert connection.execute("SELECT count(*) FROM queries").fetchone()[0] == 0
    assert vector == bytes.fromhex("0000803f00000000")

    migrate.downgrade(engine, "0002_audit")
    assert migrate.current_revision(engine) == "0002_audit"
    assert _counts(db) == before
    migrate.upgrade(engine)
    assert _counts(db) == before
    engine.dispose()


def _max_ids_after_deleting_the_last(db: Path) -> tuple[int, int]:
    """Delete the newest embedding, add another: (deleted id, id the new row received)."""
    with sqlite3.connect(db) as connection:
        connection.execute("PRAGMA foreign_keys=ON")
        (last,) = connection.execute("SELECT max(id) FROM embeddings").fetchone()
        connection.execute("DELETE FROM embeddings WHERE id = ?", (last,))
        connection.execute(
            "INSERT INTO embeddings (image_id, embedder_fingerprint, dim, vector, created_at)"
            f" VALUES (2, '{'b' * 64}', 2, x'0000803f00000000', '{NOW}')"
        )
        (new,) = connection.execute("SELECT max(id) FROM embeddings").fetchone()
    return last, new


def test_ids_are_never_reused_after_a_delete(tmp_path: Path) -> None:
    """The index watermark assumes an embedding id, once given, is never given again."""
    db = tmp_path / "lab.sqlite"
    engine = make_engine(sqlite_url(db))
    migrate.upgrade(engine, FIRST)
    _fill_first_revision(db)  # ids written before AUTOINCREMENT existed
    migrate.upgrade(engine)
    deleted, new = _max_ids_after_deleting_the_last(db)
    assert (deleted, new) == (1, 2)
    with sqlite3.connect(db) as connection:
        tables = {
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE sql LIKE '%AUTOINCREMENT%'"
            )
        }
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
    assert tables == {
        "generators",
        "images",
        "resyntheses",
        "references",
        "embeddings",
        "queries",
        "pending_resyntheses",
        "calibrations",
    }
    engine.dispose()


def test_a_fresh_lab_never_reuses_ids(tmp_path: Path) -> None:
    db = tmp_path / "lab.sqlite"
    engine = make_engine(sqlite_url(db))
    migrate.upgrade(engine)
    _fill_first_revision(db)
    with sqlite3.connect(db) as connection:  # a second embedding, then delete the newest
        connection.execute(
            "INSERT INTO embeddings (image_id, embedder_fingerprint, dim, vector, created_at)"
            f" VALUES (2, '{'b' * 64}', 2, x'0000803f00000000', '{NOW}')"
        )
    deleted, new = _max_ids_after_deleting_the_last(db)
    assert (deleted, new) == (2, 3)
    engine.dispose()


def test_calibrations_migration_round_trips(tmp_path: Path) -> None:
    """0004 adds the calibrations table and takes it away again; nothing else changes."""
    from resynth_index.store import calibrations
    from resynth_index.store.engine import make_sessionmaker

    engine, db, before = _filled_then_upgraded(tmp_path, "0003_autoincrement", "0004_calibrations")
    with make_sessionmaker(engine).begin() as session:
        saved, superseded = calibrations.save_calibration(
            session, method="resynthesis", coverage=0.9, per_generator=False,
            candidates=["b", "a"], embedder_fingerprint="b" * 64, record={"quantile": 0.5},
            settings={}, summary={},
        )  # fmt: skip
    assert (saved, superseded) == (1, [])
    with make_sessionmaker(engine).begin() as session:
        found = calibrations.active_calibration(session, ["a", "b"])
        assert found is not None and found.record == {"quantile": 0.5}
    migrate.downgrade(engine, "0003_autoincrement")
    tables = _tables(db)
    assert "calibrations" not in tables and _rows(db) == before
    migrate.upgrade(engine)
    with make_sessionmaker(engine).begin() as session:
        assert calibrations.list_calibrations(session) == []
    engine.dispose()


def test_file_digests_migration_round_trips(tmp_path: Path) -> None:
    """0005 adds the file_digests table (64-bit stats) and takes it away; nothing else changes."""
    import os

    from resynth_index.hashing import file_stat
    from resynth_index.store import digests
    from resynth_index.store.engine import make_sessionmaker

    engine, db, before = _filled_then_upgraded(tmp_path, "0004_calibrations", "0005_file_digests")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"w" * 10)
    os.utime(weights, ns=(10**18, 10**18))  # 2001: nanoseconds past 2**32, settled long ago
    stat = file_stat(weights)
    with make_sessionmaker(engine).begin() as session:
        assert digests.remember(session, [(stat, "a" * 64)]) == 1
    with make_sessionmaker(engine).begin() as session:
        assert digests.remembered(session, [stat]) == {stat: "a" * 64}
    migrate.downgrade(engine, "0004_calibrations")
    assert migrate.current_revision(engine) == "0004_calibrations"
    tables = _tables(db)
    assert "file_digests" not in tables and "calibrations" in tables and _rows(db) == before
    migrate.upgrade(engine)
    with make_sessionmaker(engine).begin() as session:
        assert digests.remembered(session, [stat]) == {}
    engine.dispose()


def test_weights_digests_migration_round_trips(tmp_path: Path) -> None:
    """0006 adds the weights_digests table and takes it away; nothing else changes."""
    from resynth_index.store import digests
    from resynth_index.store.engine import make_sessionmaker

    engine, db, before = _filled_then_upgraded(
        tmp_path, "0005_file_digests", "0006_weights_digests"
    )
    with make_sessionmaker(engine).begin() as session:
        assert digests.remember_weights(session, "a" * 64, "b" * 64)
    with make_sessionmaker(engine).begin() as session:
        assert digests.recalled_weights(session, ["a" * 64]) == {"a" * 64: "b" * 64}
    migrate.downgrade(engine, "0005_file_digests")
    tables = _tables(db)
    assert "weights_digests" not in tables and "file_digests" in tables and _rows(db) == before
    migrate.upgrade(engine)
    with make_sessionmaker(engine).begin() as session:
        assert digests.recalled_weights(session, ["a" * 64]) == {}
    engine.dispose()


def test_head_schema_matches_the_models(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "lab.sqlite"))
    migrate.upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    engine.dispose()


def test_opening_an_old_lab_upgrades_it(tmp_path: Path) -> None:
    from resynth_index.lab import Lab

    engine = make_engine(sqlite_url(tmp_path / DATABASE_FILE))
    migrate.upgrade(engine, FIRST)
    engine.dispose()
    _fill_first_revision(tmp_path / DATABASE_FILE)
    LabSettings(
        embedder={"arch": "", "weights": "local-dir:x"},
        embedder_fingerprint="b" * 64,
        embedder_dim=2,
    ).save(tmp_path)

    before = _rows(tmp_path / DATABASE_FILE)

    lab = Lab.open(tmp_path)
    assert migrate.current_revision(lab.engine) == migrate.head_revision(lab.engine)
    assert [g.name for g in lab.generators()] == ["sd15"]
    [(ids, vectors)] = list(lab.embedding_source(-1))  # today's code reads the old rows
    assert ids.tolist() == [1] and vectors.tolist() == [[1.0, 0.0]]
    lab.add_generator("midjourney", "imported")  # ... and writes next to them
    lab.close()
    after = _rows(tmp_path / DATABASE_FILE)
    assert {table: after[table] for table in before if table != "generators"} == {
        table: rows for table, rows in before.items() if table != "generators"
    }
    assert after["generators"][: len(before["generators"])] == before["generators"]
    assert len(after["generators"]) == len(before["generators"]) + 1


def _filled_then_upgraded(tmp_path: Path, below: str, revision: str) -> tuple[Any, Path, dict]:
    """A lab database at ``below`` holding the first revision's rows, then upgraded to
    ``revision``: its engine, its path and those rows as they were before the upgrade."""
    db = tmp_path / "lab.sqlite"
    engine = make_engine(sqlite_url(db))
    migrate.upgrade(engine, below)
    _fill_first_revision(db)
    before = _rows(db)
    migrate.upgrade(engine, revision)
    return engine, db, before


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as connection:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}


def _rows(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table of the first revision, in full, in id order."""
    tables = ["generators", "captions", "images", "resyntheses", '"references"', "embeddings"]
    with sqlite3.connect(db) as connection:
        return {t: connection.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}


def test_sqlite_pragmas_are_set(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "x.sqlite"))
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    engine.dispose()


@pytest.mark.parametrize("bad", ["", "{not json"])
def test_a_broken_settings_file_is_one_clear_error(tmp_path: Path, bad: str) -> None:
    from resynth_index.errors import StoreError

    (tmp_path / "settings.json").write_text(bad)
    with pytest.raises(StoreError, match="settings.json"):
        LabSettings.load(tmp_path)


def test_a_working_lab_taken_back_to_the_first_revision_upgrades_and_works(
    toy_lab: Path, tmp_path: Path
) -> None:
    """A real lab (blobs, embeddings, index) whose schema is at 0001 opens, upgrades, answers."""
    import json

    from click.testing import CliRunner
    from PIL import Image

    from resynth_index.cli import cli

    def rsx(*args: str):
        return CliRunner().invoke(cli, ["--lab", str(toy_lab), *args], catch_exceptions=False)

    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"image-{seed}.png")
        pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(paths[-1])
    assert rsx("generator", "add", "imp", "--imported").exit_code == 0
    stored = rsx(
        "ingest", str(paths[0]), "--role", "resynthesis", "--generator", "imp",
        "--caption", "a cat",
    )  # fmt: skip
    assert stored.exit_code == 0 and rsx("ingest", str(paths[1])).exit_code == 0
    db = toy_lab / DATABASE_FILE
    engine = make_engine(sqlite_url(db))
    migrate.downgrade(engine, FIRST)
    engine.dispose()
    before = _rows(db)

    check = rsx("check")  # opening the lab upgrades it
    assert check.exit_code == 0, check.output
    answer = rsx(
        "query", str(paths[2]), "--caption", "a cat", "--candidates", "imp", "--no-generate",
        "--json",
    )  # fmt: skip
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.stdout)["verdict"] == "imp"
    after = _rows(db)
    for table, rows in before.items():  # every old row kept as it was; only the query added
        assert after[table][: len(rows)] == rows
    assert sum(len(rows) for rows in after.values()) > sum(len(rows) for rows in before.values())
