"""Database engine: SQLite with WAL, a busy timeout, foreign keys, and writers that queue politely.

Writes begin with ``BEGIN IMMEDIATE`` (pysqlite's legacy transaction mode with that isolation
level), so two processes never both hold a read snapshot they then try to upgrade to a write:
the second writer waits for the busy timeout instead of failing with "database is locked".
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_S = 60.0


def sqlite_url(path: Path) -> str:
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
    def _set_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def insert_ignore(session: Session, model: type, values: list[dict] | dict, conflict: list[str]):
    """INSERT ... ON CONFLICT DO NOTHING for SQLite and PostgreSQL: idempotent under concurrency."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # pragma: no cover - other databases are not supported
        raise NotImplementedError(f"database {dialect!r} is not supported")
    statement = insert(model).values(values).on_conflict_do_nothing(index_elements=conflict)
    return session.execute(statement)
