"""imported versions record their adapter's size; dataset names as long as file names

Imported versions count toward the tenant's hourly upload quota, as datasets do, so each records the size
of its adapter file. A dataset's name falls back to its file name, so both hold 255 characters. Downgrading
cuts names over 200 characters.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("prompt_versions") as batch:
        batch.add_column(sa.Column("upload_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("name", type_=sa.String(length=255), existing_type=sa.String(length=200))


def downgrade() -> None:
    # Names over 200 characters would not fit: they are cut, not refused, so a downgrade always works.
    op.execute("UPDATE datasets SET name = substr(name, 1, 200) WHERE length(name) > 200")
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("name", type_=sa.String(length=200), existing_type=sa.String(length=255))
    with op.batch_alter_table("prompt_versions") as batch:
        batch.drop_column("upload_bytes")
