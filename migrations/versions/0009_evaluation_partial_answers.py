"""evaluations keep the answers of the rows already scored when they yield their worker

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations") as batch:
        batch.add_column(sa.Column("partial_answers", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    # An older server starts a queued evaluation from its first row: nothing is lost but time.
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_column("partial_answers")
