"""Database engine: SQLite with WAL, a busy timeout, foreign keys, and writers that queue politely.

Writes begin with ``BEGIN IMMEDIATE`` (pysqlite's legacy transaction mode with that isolation
level), so two processes never both hold a read snapshot they then try to upgrade to a write:
the second writer waits for the busy timeout instead of failing with "database is locked".

A lab may instead keep its database on a PostgreSQL server (``rsx init --database URL``, the
``[scale]`` extra), so that several machines share one store. Its URL never holds a password:
libpq finds that where it always does (``PGPASSWORD``, ``~/.pgpass``, a service file).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import quote, unquote

from sqlalchemy import CursorResult, Engine, Table, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from resynth_index.errors import StoreError

BUSY_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 30  # a PostgreSQL server that does not answer: one clear error, not a hang
POSTGRESQL_DRIVER = "postgresql+psycopg"  # psycopg 3, from the [scale] extra
IN_CHUNK = 500  # values per IN (...) list: well under SQLite's bound-parameter limit

_T = TypeVar("_T")


def sqlite_url(path: Path, *, existing: bool = False) -> str:
    """The SQLAlchemy URL of the SQLite database file at ``path``. ``existing``: the file must
    be there already (SQLite's ``mode=rw``): a missing database is an error, never silently
    created anew (an opened lab's database is its evidence; only ``rsx init`` makes one)."""
    if not existing:
        return f"sqlite:///{path}"
    return f"sqlite:///file:{quote(str(path))}?mode=rw&uri=true"


def database_url(text: str) -> str:
    """The PostgreSQL URL a lab records for ``text`` (``rsx init --database``), checked.

    ``postgresql://``, ``postgres://`` and ``postgresql+psycopg://`` all mean psycopg 3. A URL
    holding a password is refused (settings.json is no place for one): the password comes from
    libpq's usual places. Raises StoreError (one line) for anything else.
    """
    try:
        url = make_url(text.strip())
    except ArgumentError:
        raise StoreError(
            f"cannot read the database URL {text!r}: use "
            f"{POSTGRESQL_DRIVER}://USER@HOST:PORT/DATABASE"
        ) from None
    if url.drivername not in ("postgresql", "postgres", POSTGRESQL_DRIVER):
        raise StoreError(
            f"unsupported database {url.drivername!r}: a lab keeps its database in its own SQLite"
            f" file (the default) or on PostgreSQL ({POSTGRESQL_DRIVER}://USER@HOST:PORT/DATABASE)"
        )
    if url.password is not None or "password" in url.query:
        raise StoreError(
            "the database URL must not hold a password (it would be written to settings.json):"
            " give it in PGPASSWORD or ~/.pgpass instead"
        )
    if not url.database:
        raise StoreError(f"the database URL {text!r} names no database")
    return url.set(drivername=POSTGRESQL_DRIVER).render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets the pragmas above, PostgreSQL a connect timeout."""
    if url.startswith("postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreError(
                "this lab's database is on PostgreSQL, which needs psycopg 3: "
                "pip install 'resynth-index[scale]'"
            ) from None
        return create_engine(
            url,
            pool_pre_ping=True,
            connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "rsx"},
        )
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


@contextmanager
def reaching_database(engine: Engine) -> Iterator[None]:
    """Turn a failure of ``engine``'s database (server down, refused, bad credentials, no such
    database, a corrupt or read-only file) into one line: a StoreError that names the database,
    never its password, and says what to do (see ``database_failure``)."""
    try:
        yield
    except DBAPIError as error:
        raise StoreError(database_failure(error, database_name(engine))) from None


def database_name(engine: Engine) -> str:
    """How a message names ``engine``'s database: the SQLite file's path, or the server's URL
    without its password."""
    if engine.dialect.name == "sqlite":
        return unquote(str(engine.url.database or "").removeprefix("file:").partition("?")[0])
    return engine.url.render_as_string(hide_password=True)


#: What the database's own words mean, and what the user can do about it: (words in the
#: driver's message, what it means, what to do). The first that matches is used.
_FAILURES = (
    (
        ("malformed", "not a database", "corrupt"),
        "is corrupt",
        "restore it from a backup (with its -wal file, if one was saved beside it), then run"
        " 'rsx check'; the blobs and the index were not touched",
    ),
    (
        ("readonly", "read-only", "unable to open database file", "permission denied"),
        "cannot be written",
        "the lab is read-only for this user or on a read-only filesystem; run the command"
        " where the lab can be written",
    ),
    (
        ("disk is full", "no space", "disk i/o error", "could not extend"),
        "could not be written",
        "free disk space, then rerun the command: what was stored before is kept",
    ),
    (
        ("database is locked",),
        "stayed locked by another process",
        f"another rsx held it for over {BUSY_TIMEOUT_S:.0f} s; rerun once it has finished",
    ),
    (
        ("does not exist", "authentication", "password", "role "),
        "refused this lab",
        "check the URL in the lab's settings.json and the credentials (PGPASSWORD, ~/.pgpass)",
    ),
    (
        (
            "connection", "server closed", "terminating", "shutting down", "timeout",
            "timed out", "could not receive", "could not send", "ssl",
        ),
        "could not be reached",
        "check that its server runs and can be reached, then rerun the command: what was"
        " committed before is kept, nothing half-written is",
    ),
)  # fmt: skip


def database_failure(error: BaseException, where: str) -> str:
    """One line for a failure of the database at ``where``: what happened, in the driver's own
    first line (no SQL, no parameters), and what to do. ``error``: SQLAlchemy's wrapper
    (``DBAPIError``) or the driver's own exception."""
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines() or [type(original).__name__]
    said = lines[0].strip()
    lowered = said.lower()
    for words, meaning, remedy in _FAILURES:
        if any(word in lowered for word in words):
            return f"the lab's database {where} {meaning} ({said}): {remedy}"
    return f"the lab's database {where} failed ({said}): nothing of the unfinished step was kept"


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the lab hands rows to its callers)."""
    return sessionmaker(engine, expire_on_commit=False)


def _dialect_insert(session: Session, model: type) -> Any:
    """The INSERT of the session's dialect (SQLite or PostgreSQL), which knows ON CONFLICT."""
    return dialect_insert(session.get_bind().dialect.name, model)


def table_of(model: type) -> Table:
    """The table of an ORM class, for plain table statements (no ORM bulk machinery)."""
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


def dialect_insert(dialect: str, model: type | Table) -> Any:
    """The INSERT of the dialect named (``sqlite`` or ``postgresql``), which knows ON CONFLICT,
    into an ORM class's table or a ``Table`` (a plain table statement: no ORM bulk machinery)."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(model)
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(model)
    raise NotImplementedError(f"database {dialect!r} is not supported")  # pragma: no cover


def insert_ignore(
    session: Session,
    model: type,
    values: list[dict[str, Any]] | dict[str, Any],
    conflict: list[str],
) -> CursorResult[Any]:
    """INSERT ... ON CONFLICT DO NOTHING for SQLite and PostgreSQL: idempotent under concurrency.

    The result's ``rowcount`` is how many rows this call inserted (0: all were there already).
    """
    statement = _dialect_insert(session, model)
    statement = statement.values(values).on_conflict_do_nothing(index_elements=conflict)
    # SQLAlchemy keeps an INSERT's rowcount only when asked: without this, psycopg's result
    # says -1 (which reads as "inserted") whether or not a row went in
    statement = statement.execution_options(preserve_rowcount=True)
    return cast("CursorResult[Any]", session.execute(statement))


def insert_ignore_many(
    session: Session, model: type, rows: list[dict[str, Any]], conflict: list[str]
) -> None:
    """``insert_ignore`` of many rows as one executemany of a one-row statement: its compiled
    form is cached, where a multi-row VALUES is compiled again for every call (about 3 ms for a
    batch of 32 embeddings on the 2-core VM). Rows must all name the same columns."""
    if not rows:
        return
    table = table_of(model)
    dialect = session.get_bind().dialect.name
    key = (dialect, table.name, tuple(conflict))
    statement = _IGNORING_INSERTS.get(key)
    if statement is None:  # built once: building it costs more than the insert of a few rows
        statement = _IGNORING_INSERTS[key] = dialect_insert(dialect, table).on_conflict_do_nothing(
            index_elements=conflict
        )
    session.execute(statement, rows)


_IGNORING_INSERTS: dict[tuple[str, str, tuple[str, ...]], Any] = {}


def in_chunks(values: Iterable[_T]) -> Iterator[list[_T]]:
    """The distinct ``values`` (first occurrence order) in lists short enough for one IN (...)."""
    distinct = list(dict.fromkeys(values))
    for start in range(0, len(distinct), IN_CHUNK):
        yield distinct[start : start + IN_CHUNK]
