"""Running the Alembic migrations that ship inside the package (no alembic.ini needed)."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from resynth_index.errors import StoreError


def alembic_config(engine: Engine) -> Config:
    """An Alembic config pointing at the packaged scripts and at ``engine``'s database."""
    config = Config()
    config.set_main_option("script_location", str(files("resynth_index.migrations")))
    # the option is only informative (env.py uses the engine itself); ConfigParser reads '%' as
    # interpolation, and URLs escape characters with it (a socket path: host=%2Frun%2F...)
    url = engine.url.render_as_string(hide_password=True)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["engine"] = engine
    return config


def head_revision(engine: Engine) -> str:
    """The newest migration this code ships."""
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    if head is None:  # pragma: no cover - a broken install
        raise StoreError("this installation holds no database migrations")
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None for an empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database up to ``revision``."""
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database down to ``revision`` (tests of the migrations use it)."""
    command.downgrade(alembic_config(engine), revision)


def ensure_current(engine: Engine) -> bool:
    """Upgrade to head if the database is older; return True when a migration ran."""
    if current_revision(engine) == head_revision(engine):
        return False
    upgrade(engine)
    return True
