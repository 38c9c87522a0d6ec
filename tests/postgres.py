"""A throwaway PostgreSQL server for the tests, and labs on either engine.

``postgres_server`` (one per test session) runs Debian's binaries (``/usr/lib/postgresql/*/bin``,
or the folder named by ``RSX_PG_BIN``): ``initdb`` into a temporary folder, then ``pg_ctl
start`` listening on 127.0.0.1 at a free port, its socket inside that folder, trusting local
connections (so no password anywhere), durability switched off (nothing here outlives the
session). PostgreSQL refuses to run as root, and CI runs as root: then the server runs as
``nobody``, which owns the temporary folder. Without the binaries or psycopg the tests that need
it are skipped, or failed under ``RSX_REQUIRE_SERVICES=1`` (tests/services.py).

``engine_url`` gives an empty database on each engine (``sqlite`` and ``postgresql``);
``engine_lab`` a fresh copy of the toy lab (toy embedder, three toy generators) on each engine,
each PostgreSQL one in a database of its own, cloned from a template database.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from services import require_service

from resynth_index.config import LabSettings
from resynth_index.store.engine import sqlite_url

PG_BIN_ENV = "RSX_PG_BIN"
SUPERUSER = "rsx"
UNPRIVILEGED = "nobody"
START_ATTEMPTS = 3
ENGINES = ("sqlite", "postgresql")

_names = itertools.count(1)


def find_pg_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: ``$RSX_PG_BIN`` when set (only there),
    else the newest Debian version under /usr/lib/postgresql, else where ``pg_ctl`` is on the
    PATH; None when there is none."""
    if os.environ.get(PG_BIN_ENV):
        candidates = [Path(os.environ[PG_BIN_ENV])]
    else:
        versions = Path("/usr/lib/postgresql").glob("*/bin")
        candidates = sorted(versions, key=lambda p: _version(p.parent.name), reverse=True)
        on_path = shutil.which("pg_ctl")
        if on_path:
            candidates.append(Path(on_path).parent)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (another process may take it before
    the server binds it: the start is retried on another port then)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class _Account:
    """Whom the server's processes run as: None when we are not root (run as ourselves)."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_server(cls) -> _Account:
        if os.geteuid() != 0:
            return cls()
        entry = pwd.getpwnam(UNPRIVILEGED)
        return cls(entry.pw_uid, entry.pw_gid)

    def run(self, command: list[str], log: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
        """Run ``command`` as this account, its output appended to ``log`` (never a pipe: the
        server that ``pg_ctl start`` leaves behind must not hold one of ours open)."""
        switch: dict[str, Any] = {}
        if self.uid is not None:
            switch = {"user": self.uid, "group": self.gid, "extra_groups": []}
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "LANG": "C",
            "TZ": "UTC",
        }
        with open(log, "a", encoding="utf-8") as out:
            os.chmod(log, 0o666)
            return subprocess.run(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                text=True,
                timeout=120,
                check=False,
                **switch,
            )


@dataclass
class PostgresServer:
    """A running throwaway cluster: connect as ``SUPERUSER`` over TCP, no password (trust)."""

    bin_dir: Path
    base: Path  # the temporary folder: data/, the socket, the logs
    port: int
    account: _Account
    host: str = "127.0.0.1"
    user: str = SUPERUSER
    options: str = ""  # what ``pg_ctl start -o`` was given: ``start_again`` gives it again

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server (no password: trust)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres", autocommit: bool = True) -> Any:
        """A psycopg connection to ``database``."""
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=database,
            autocommit=autocommit,
            connect_timeout=30,
        )

    def create_database(self, template: str | None = None) -> str:
        """A new, uniquely named database (a copy of ``template`` when given); its name."""
        name = f"rsx_{os.getpid()}_{next(_names)}"
        clause = f" TEMPLATE {template}" if template else ""
        with self.connect() as connection:
            connection.execute(f"CREATE DATABASE {name}{clause}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any session still connected to it."""
        with self.connect() as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def require_password(self, role: str, password: str) -> None:
        """Make ``role`` a login that must give ``password`` over TCP (scram-sha-256): a rule
        ahead of the cluster's 'trust' ones in pg_hba.conf, then a reload."""
        with self.connect() as connection:
            exists = connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            verb = "ALTER" if exists.fetchone() else "CREATE"
            connection.execute(f"{verb} ROLE {role} LOGIN PASSWORD '{password}'")
        hba = self.data_dir / "pg_hba.conf"
        rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
        text = hba.read_text()
        if rule not in text:
            hba.write_text(rule + text)  # rewritten in place: its owner stays the server's
        self.account.run(
            [str(self.bin_dir / "pg_ctl"), "reload", "-D", str(self.data_dir)],
            self.base / "pg_ctl.log",
            self.base,
        )
        with self.connect() as connection:  # the reload is asynchronous: wait until it took
            wait_until(
                lambda: bool(
                    connection.execute(
                        "SELECT count(*) FROM pg_hba_file_rules WHERE %s = ANY(user_name)",
                        (role,),
                    ).fetchone()[0]
                ),
                what="pg_hba.conf to be reloaded",
            )

    def log_tail(self, lines: int = 20) -> str:
        log = self.base / "server.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def start_postgres(bin_dir: Path, *, durable: bool = False) -> PostgresServer:
    """initdb + pg_ctl start in a new temporary folder; raises RuntimeError with the log.

    Without ``durable`` the server skips flushing (fsync, synchronous_commit and full-page
    writes off): quick, and nothing here outlives the session. A test that stops a server
    abruptly and counts what survived needs ``durable``: an unflushed commit would be lost."""
    account = _Account.for_server()
    # not under pytest's base temp: that folder is private to us, and the server may be nobody
    base = Path(tempfile.mkdtemp(prefix="rsx-pg-"))
    if account.uid is not None:
        os.chown(base, account.uid, account.gid or -1)
    init = account.run(
        [
            str(bin_dir / "initdb"),
            "-D", str(base / "data"),
            "-U", SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        base / "initdb.log",
        base,
    )  # fmt: skip
    if init.returncode != 0:
        log = (base / "initdb.log").read_text(errors="replace")
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({init.returncode}):\n{log}")
    for attempt in range(START_ATTEMPTS):
        port = _free_port()
        options = " ".join(
            [
                f"-c port={port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={base}",
                *([] if durable else ["-c fsync=off", "-c synchronous_commit=off"]),
                *([] if durable else ["-c full_page_writes=off"]),
                "-c max_connections=200",
            ]
        )
        server = PostgresServer(bin_dir, base, port, account, options=options)
        if _pg_ctl_start(server).returncode == 0:
            return server
        if attempt == START_ATTEMPTS - 1:
            detail = (base / "pg_ctl.log").read_text(errors="replace") + server.log_tail()
            stop_postgres(server)
            raise RuntimeError(f"PostgreSQL did not start:\n{detail}")
    raise AssertionError("unreachable")


def _pg_ctl_start(server: PostgresServer) -> subprocess.CompletedProcess[str]:
    return server.account.run(
        [
            str(server.bin_dir / "pg_ctl"), "start", "-w", "-t", "60",
            "-D", str(server.data_dir), "-l", str(server.base / "server.log"),
            "-o", server.options,
        ],
        server.base / "pg_ctl.log",
        server.base,
    )  # fmt: skip


def stop_now(server: PostgresServer) -> None:
    """Stop the server at once, as a crash or a pulled cable would (``-m immediate``: sessions
    are cut without a goodbye); its data stays for ``start_again``."""
    stopped = server.account.run(
        [str(server.bin_dir / "pg_ctl"), "stop", "-w", "-m", "immediate", "-D",
         str(server.data_dir)],
        server.base / "pg_ctl.log",
        server.base,
    )  # fmt: skip
    if stopped.returncode != 0:
        raise RuntimeError(f"PostgreSQL did not stop:\n{server.log_tail()}")


def start_again(server: PostgresServer) -> None:
    """Start a server ``stop_now`` stopped, on the same port and data (crash recovery runs)."""
    if _pg_ctl_start(server).returncode != 0:
        raise RuntimeError(f"PostgreSQL did not start again:\n{server.log_tail()}")


def stop_postgres(server: PostgresServer) -> None:
    """Stop the server (fast shutdown: open sessions are ended) and delete its folder."""
    try:
        if (server.data_dir / "postmaster.pid").exists():
            server.account.run(
                [str(server.bin_dir / "pg_ctl"), "stop", "-w", "-m", "fast", "-D",
                 str(server.data_dir)],
                server.base / "pg_ctl.log",
                server.base,
            )  # fmt: skip
    finally:
        shutil.rmtree(server.base, ignore_errors=True)


def postgres_missing() -> str | None:
    """Why no server can be started here, or None when one can."""
    if find_pg_bin() is None:
        return (
            "no PostgreSQL binaries (initdb, pg_ctl, postgres) in /usr/lib/postgresql/*/bin, "
            f"${PG_BIN_ENV} or the PATH; install Debian's 'postgresql' package"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 is not installed: pip install -e '.[dev]' (or '.[scale]')"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole session, stopped at its end."""
    reason = postgres_missing()
    require_service("postgresql", reason is None, reason or "")
    bin_dir = find_pg_bin()
    assert bin_dir is not None
    server = start_postgres(bin_dir)
    try:
        yield server
    finally:
        stop_postgres(server)


def wait_until(condition: Any, timeout: float = 60.0, what: str = "the condition") -> None:
    """Poll ``condition()`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(params=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    """The engine a test runs on: 'sqlite' or 'postgresql' (the test runs once on each)."""
    return str(request.param)


@pytest.fixture
def engine_url(engine_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database on this engine (dropped after the test on PostgreSQL)."""
    if engine_name == "sqlite":
        return sqlite_url(tmp_path / "empty.sqlite")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database()
    request.addfinalizer(lambda: server.drop_database(name))
    return server.url(name)


@pytest.fixture(scope="session")
def postgres_lab_template(
    postgres_server: PostgresServer,
    toy_lab_template: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, str]:
    """The toy lab with its store in a PostgreSQL template database: (lab folder, database),
    made by ``toy_lab_on``."""
    root = tmp_path_factory.mktemp("pg-template") / "lab"
    return root, toy_lab_on(postgres_server, toy_lab_template, root)


def toy_lab_on(server: PostgresServer, toy_lab_template: Path, root: Path) -> str:
    """Make ``root`` a copy of the SQLite toy lab whose store is a new database on ``server``
    (its name is returned): the toy models are reused, not rebuilt; the database gets the
    schema as ``rsx init`` gives it (opening a lab never creates one), and the toy generators
    are registered there again."""
    from conftest import TOY_GENERATORS

    from resynth_index.lab import Lab
    from resynth_index.store import migrate
    from resynth_index.store.engine import make_engine

    shutil.copytree(toy_lab_template, root, ignore=shutil.ignore_patterns("lab.sqlite*"))
    database = server.create_database()
    engine = make_engine(server.url(database))
    migrate.upgrade(engine)
    engine.dispose()
    _point_at(root, server.url(database))
    with Lab.open(root) as lab:
        for name, seed in TOY_GENERATORS.items():
            lab.add_toy_generator(name, seed)
    return database


def _point_at(root: Path, url: str) -> None:
    settings = LabSettings.load(root)
    settings.database_url = url
    settings.save(root)


@pytest.fixture
def engine_lab(engine_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A fresh toy lab (toy embedder; generators toy-a, toy-b, toy-c) on this engine."""
    target = tmp_path / "lab"
    if engine_name == "sqlite":
        shutil.copytree(request.getfixturevalue("toy_lab_template"), target)
        return target
    server: PostgresServer = request.getfixturevalue("postgres_server")
    template_root, template = request.getfixturevalue("postgres_lab_template")
    database = server.create_database(template=template)
    request.addfinalizer(lambda: server.drop_database(database))
    shutil.copytree(template_root, target)
    _point_at(target, server.url(database))
    return target
