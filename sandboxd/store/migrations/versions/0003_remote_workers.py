"""Remote workers: their API URL, the operator's drain flag, and worker tokens (SHA-256 hashes).

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

from sandboxd.store.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("url", sa.String(255), nullable=True))
        batch.add_column(sa.Column("draining", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("token_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("token_id")
        batch.drop_column("draining")
        batch.drop_column("url")
    op.drop_table("worker_tokens")
