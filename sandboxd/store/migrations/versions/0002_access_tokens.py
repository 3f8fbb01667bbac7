"""Sandbox access tokens (preview links): one sandbox's ports, stored as SHA-256 hashes.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

from sandboxd.store.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sandbox_access_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "sandbox_id", sa.String(32), sa.ForeignKey("sandboxes.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_sandbox_access_tokens_sandbox_id", "sandbox_access_tokens", ["sandbox_id"])


def downgrade() -> None:
    op.drop_table("sandbox_access_tokens")
