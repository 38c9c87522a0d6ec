"""The first lab schema: generators, captions, images, resyntheses, references, embeddings.

Revision ID: 0001_initial
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "generators",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("settings_json", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "captions",
        sa.Column("hash", sa.String(64), primary_key=True),
        sa.Column("text", sa.Text(), nullable=False),
        _created_at(),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("blob_path", sa.String(200), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        _created_at(),
    )
    op.create_table(
        "resyntheses",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("generator_id", sa.Integer(), sa.ForeignKey("generators.id"), nullable=False),
        sa.Column("caption_hash", sa.String(64), sa.ForeignKey("captions.hash"), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("settings_hash", sa.String(64), nullable=False),
        _created_at(),
        sa.UniqueConstraint("generator_id", "caption_hash", "settings_hash", "seed"),
    )
    op.create_index("ix_resyntheses_caption", "resyntheses", ["caption_hash", "generator_id"])
    op.create_table(
        "references",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("generator_id", sa.Integer(), sa.ForeignKey("generators.id"), nullable=False),
        sa.Column("caption_hash", sa.String(64), sa.ForeignKey("captions.hash"), nullable=True),
        _created_at(),
        sa.UniqueConstraint("image_id", "generator_id"),
    )
    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("embedder_fingerprint", sa.String(64), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        _created_at(),
        sa.UniqueConstraint("image_id", "embedder_fingerprint"),
    )
    op.create_index("ix_embeddings_fingerprint_id", "embeddings", ["embedder_fingerprint", "id"])


def downgrade() -> None:
    op.drop_index("ix_embeddings_fingerprint_id", table_name="embeddings")
    op.drop_table("embeddings")
    op.drop_table("references")
    op.drop_index("ix_resyntheses_caption", table_name="resyntheses")
    op.drop_table("resyntheses")
    op.drop_table("images")
    op.drop_table("captions")
    op.drop_table("generators")
