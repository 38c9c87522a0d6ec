"""Alembic environment for rsx labs: run online against the engine the lab hands over."""

from alembic import context
from sqlalchemy import create_engine

from resynth_index.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    engine = config.attributes.get("engine")
    if engine is None:  # invoked from the alembic command line with a URL
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite cannot ALTER most things: copy-and-move tables instead
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("rsx migrations run online only")
run_migrations()
