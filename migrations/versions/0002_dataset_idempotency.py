"""datasets: Idempotency-Key on upload

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 04:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite can only add a unique constraint by rebuilding the table.
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("request_sha256", sa.String(length=64), nullable=True))
        batch.create_unique_constraint("uq_datasets_idempotency_key", ["idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint("uq_datasets_idempotency_key", type_="unique")
        batch.drop_column("request_sha256")
        batch.drop_column("idempotency_key")
