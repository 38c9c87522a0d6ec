"""Audit records of queries, and work orders for imported generators.

Revision ID: 0002_audit
Revises: 0001_initial
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_audit"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "queries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_path", sa.Text(), nullable=False),
        sa.Column("caption_hash", sa.String(64), sa.ForeignKey("captions.hash"), nullable=False),
        sa.Column("caption_source", sa.String(200), nullable=False),
        sa.Column("candidates_json", sa.Text(), nullable=False),
        sa.Column("fingerprints_json", sa.Text(), nullable=False),
        sa.Column("distances_json", sa.Text(), nullable=False),
        sa.Column("verdict", sa.String(128), nullable=False),
        sa.Column("result_json", sa.Text(), nullable=False),
    )
    op.create_index("ix_queries_image_sha256", "queries", ["image_sha256"])
    op.create_table(
        "pending_resyntheses",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("generator_id", sa.Integer(), sa.ForeignKey("generators.id"), nullable=False),
        sa.Column("caption_hash", sa.String(64), sa.ForeignKey("captions.hash"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("generator_id", "caption_hash"),
    )


def downgrade() -> None:
    op.drop_table("pending_resyntheses")
    op.drop_index("ix_queries_image_sha256", table_name="queries")
    op.drop_table("queries")
