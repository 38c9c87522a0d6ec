"""Remembered file digests: a file read once (a checkpoint, an ingested image) need not be read
again while its device, inode, size, mtime and ctime are unchanged (``store/digests.py``).

Revision ID: 0005_file_digests
Revises: 0004_calibrations
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_file_digests"
down_revision = "0004_calibrations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "file_digests",
        sa.Column("path", sa.Text(), primary_key=True),
        # 64-bit on both engines: inodes, devices and nanosecond times overflow a 32-bit INTEGER
        sa.Column("device", sa.BigInteger(), nullable=False),
        sa.Column("inode", sa.BigInteger(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("ctime_ns", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("file_digests")
