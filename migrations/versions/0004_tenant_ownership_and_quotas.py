"""every dataset, job and task belongs to a tenant; tenants' quotas

Rows made before tenants existed go to the tenant "default", which owns what is made while the service runs
open on the loopback interface (docs/operations.md). Task names and Idempotency-Keys become unique per
tenant. Downgrading fails if two tenants have a task of the same name or used the same Idempotency-Key.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 10:00:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_TENANT = "default"
# SQLite reflects unnamed unique constraints without a name; the convention names them so they can be dropped.
NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
# table -> the column whose uniqueness becomes per tenant
PER_TENANT = {"datasets": "idempotency_key", "tuning_jobs": "idempotency_key", "tasks": "name"}
QUOTA_COLUMNS = (
    sa.Column("max_active_jobs", sa.Integer(), nullable=True),
    sa.Column("upload_bytes_per_hour", sa.BigInteger(), nullable=True),
    sa.Column("inference_rps", sa.Integer(), nullable=True),
)


def _unique_name(table: str, columns: list[str]) -> str:
    for constraint in sa.inspect(op.get_bind()).get_unique_constraints(table):
        if constraint["column_names"] == columns and constraint["name"]:
            return constraint["name"]
    return f"uq_{table}_{columns[0]}"


def _default_tenant_id() -> int:
    bind = op.get_bind()
    tenants = sa.table(
        "tenants", sa.column("id", sa.Integer), sa.column("name"), sa.column("created_at", sa.DateTime(True))
    )
    found = bind.execute(sa.select(tenants.c.id).where(tenants.c.name == DEFAULT_TENANT)).scalar()
    if found is None:
        bind.execute(sa.insert(tenants).values(name=DEFAULT_TENANT, created_at=datetime.now(UTC)))
        found = bind.execute(sa.select(tenants.c.id).where(tenants.c.name == DEFAULT_TENANT)).scalar()
    return found


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        for column in QUOTA_COLUMNS:
            batch.add_column(column.copy())
    owner = _default_tenant_id()

    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))
    # Older rows did not record the uploaded file's size; their stored records are the nearest measure.
    op.execute(sa.text("UPDATE datasets SET size_bytes = length(records)"))
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("size_bytes", existing_type=sa.BigInteger(), nullable=False)

    for table, column in PER_TENANT.items():
        old_unique = _unique_name(table, [column])
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant_id", sa.Integer(), nullable=True))
        op.execute(sa.text(f"UPDATE {table} SET tenant_id = :owner").bindparams(owner=owner))
        with op.batch_alter_table(table, naming_convention=NAMING) as batch:
            batch.alter_column("tenant_id", existing_type=sa.Integer(), nullable=False)
            batch.create_foreign_key(f"fk_{table}_tenant_id", "tenants", ["tenant_id"], ["id"])
            batch.create_index(f"ix_{table}_tenant_id", ["tenant_id"])
            batch.drop_constraint(old_unique, type_="unique")
            batch.create_unique_constraint(f"uq_{table}_tenant_id_{column}", ["tenant_id", column])


def downgrade() -> None:
    for table, column in PER_TENANT.items():
        with op.batch_alter_table(table, naming_convention=NAMING) as batch:
            batch.drop_constraint(f"uq_{table}_tenant_id_{column}", type_="unique")
            batch.create_unique_constraint(f"uq_{table}_{column}", [column])
            batch.drop_index(f"ix_{table}_tenant_id")
            batch.drop_constraint(f"fk_{table}_tenant_id", type_="foreignkey")
            batch.drop_column("tenant_id")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("size_bytes")
    with op.batch_alter_table("tenants") as batch:
        for column in QUOTA_COLUMNS:
            batch.drop_column(column.name)
