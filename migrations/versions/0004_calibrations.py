"""Calibrations of prediction sets (``rsx calibrate``), every one kept for audit.

Revision ID: 0004_calibrations
Revises: 0003_autoincrement
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_calibrations"
down_revision = "0003_autoincrement"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("coverage", sa.Float(), nullable=False),
        sa.Column("per_generator", sa.Boolean(), nullable=False),
        sa.Column("candidates_json", sa.Text(), nullable=False),
        sa.Column("embedder_fingerprint", sa.String(64), nullable=False),
        sa.Column("record_json", sa.Text(), nullable=False),
        sa.Column("settings_json", sa.Text(), nullable=False),
        sa.Column("summary_json", sa.Text(), nullable=False),
        sa.Column("superseded_by", sa.Integer(), sa.ForeignKey("calibrations.id"), nullable=True),
        sqlite_autoincrement=True,  # ids are never reused (see 0003); PostgreSQL ignores it
    )


def downgrade() -> None:
    op.drop_table("calibrations")
