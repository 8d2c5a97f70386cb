"""jobs and evaluations carry their client's metadata, and a row per pair for the lists to filter on

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 19:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("tuning_jobs", "evaluations"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("metadata", sa.JSON(), nullable=True))
    op.create_table(
        "run_metadata",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("tuning_jobs.id", ondelete="CASCADE"), nullable=True),
        sa.Column(
            "evaluation_id", sa.Integer(), sa.ForeignKey("evaluations.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=512), nullable=False),
    )
    op.create_index("ix_run_metadata_job_id", "run_metadata", ["job_id"])
    op.create_index("ix_run_metadata_evaluation_id", "run_metadata", ["evaluation_id"])
    op.create_index("ix_run_metadata_pair", "run_metadata", ["key", "value"])


def downgrade() -> None:
    # An older server neither shows nor filters by metadata; the runs themselves are untouched.
    op.drop_table("run_metadata")
    for table in ("tuning_jobs", "evaluations"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("metadata")
