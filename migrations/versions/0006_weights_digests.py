"""Remembered weights digests: a model loaded again from the same files in the same way need not
have its tensors hashed again (``models/weights_digests.py``, ``store/digests.py``).

Revision ID: 0006_weights_digests
Revises: 0005_file_digests
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_weights_digests"
down_revision = "0005_file_digests"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "weights_digests",
        sa.Column("load_key", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("weights_digests")
