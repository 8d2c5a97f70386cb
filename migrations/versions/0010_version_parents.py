"""a version records the version its job started from (init strategy "version")

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("prompt_versions") as batch:
        batch.add_column(sa.Column("parent", sa.String(length=200), nullable=True))


def downgrade() -> None:
    # An older server shows no lineage; the versions themselves are untouched.
    with op.batch_alter_table("prompt_versions") as batch:
        batch.drop_column("parent")
