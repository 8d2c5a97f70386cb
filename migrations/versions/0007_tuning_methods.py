"""versions and jobs record their tuning method: prompt (input embeddings) or prefix (keys and values)

Every version and job made before this revision is prompt tuning. Downgrading deletes the prefix versions
(an older server could not read them) and fails the prefix jobs still queued or running.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("prompt_versions", "tuning_jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("method", sa.String(length=16), nullable=False, server_default="prompt")
            )


def downgrade() -> None:
    op.execute("DELETE FROM prompt_versions WHERE method = 'prefix'")
    op.execute(
        "UPDATE tuning_jobs SET status = 'failed', error_code = 'method_removed', "
        "error_message = 'Prefix tuning is not available in this version of the service.' "
        "WHERE method = 'prefix' AND status IN ('queued', 'running')"
    )
    for table in ("tuning_jobs", "prompt_versions"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("method")
