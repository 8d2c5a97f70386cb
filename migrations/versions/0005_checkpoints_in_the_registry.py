"""checkpoints in the registry

A running job's checkpoint moves from <data dir>/checkpoints to the job_checkpoints table, so workers on
different machines resume each other's jobs (a checkpoint file left by an older worker is not read: that
job restarts from step 0). Downgrading drops the saved checkpoints.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_checkpoints",
        sa.Column(
            "job_id",
            sa.Integer(),
            sa.ForeignKey("tuning_jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_checkpoints")
