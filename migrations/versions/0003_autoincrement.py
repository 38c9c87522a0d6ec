"""Integer ids are never reused: SQLite AUTOINCREMENT on every table with an integer id.

Without AUTOINCREMENT, SQLite hands the largest id out again after that row is deleted. The FAISS
index's watermark (the largest embedding id it holds) and audit ids cited in reports both assume an
id, once given, always means the same row. Each table is rebuilt (batch mode copies its rows with
their ids), and SQLite's sequence starts above the largest id already present. PostgreSQL
sequences never hand an id out twice, so there the migration changes nothing.

Revision ID: 0003_autoincrement
Revises: 0002_audit
"""

from alembic import op

revision = "0003_autoincrement"
down_revision = "0002_audit"
branch_labels = None
depends_on = None

# Parents before children, so each rebuilt table's foreign keys point at a finished table.
TABLES = (
    "generators",
    "images",
    "resyntheses",
    "references",
    "embeddings",
    "queries",
    "pending_resyntheses",
)


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
