"""Database engine: SQLite with WAL, a busy timeout, foreign keys, and writers that queue politely.

Writes begin with ``BEGIN IMMEDIATE`` (pysqlite's legacy transaction mode with that isolation
level), so two processes never both hold a read snapshot they then try to upgrade to a write:
the second writer waits for the busy timeout instead of failing with "database is locked".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_S = 60.0
IN_CHUNK = 500  # values per IN (...) list: well under SQLite's bound-parameter limit

_T = TypeVar("_T")


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of the SQLite database file at ``path``."""
    return f"sqlite:///{path}"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets the pragmas above, other databases are used as is."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(
        url,
        connect_args={"timeout": BUSY_TIMEOUT_S, "isolation_level": "IMMEDIATE"},
    )

    @event.listens_for(engine, "connect")
    def _set_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the lab hands rows to its callers)."""
    return sessionmaker(engine, expire_on_commit=False)


def insert_ignore(
    session: Session,
    model: type,
    values: list[dict[str, Any]] | dict[str, Any],
    conflict: list[str],
) -> CursorResult[Any]:
    """INSERT ... ON CONFLICT DO NOTHING for SQLite and PostgreSQL: idempotent under concurrency.

    The result's ``rowcount`` is how many rows this call inserted (0: all were there already).
    """
    dialect = session.get_bind().dialect.name
    statement: Any
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        statement = sqlite_insert(model)
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        statement = postgresql_insert(model)
    else:  # pragma: no cover - other databases are not supported
        raise NotImplementedError(f"database {dialect!r} is not supported")
    statement = statement.values(values).on_conflict_do_nothing(index_elements=conflict)
    return cast("CursorResult[Any]", session.execute(statement))


def in_chunks(values: Iterable[_T]) -> Iterator[list[_T]]:
    """The distinct ``values`` (first occurrence order) in lists short enough for one IN (...)."""
    distinct = list(dict.fromkeys(values))
    for start in range(0, len(distinct), IN_CHUNK):
        yield distinct[start : start + IN_CHUNK]
