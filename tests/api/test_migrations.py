from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from app.db.migrate import downgrade, upgrade
from app.db.models import Base
from app.db.session import get_engine

pytestmark = pytest.mark.servers  # the revisions, on each database


def test_the_migrations_build_exactly_the_models_tables(stack):
    """`softprompt db upgrade` on an empty database (the session's template ran it) gives what the code
    expects."""
    with get_engine(stack.database_url).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


RECORDS = b'["a", "b"]\n["c", "d"]'


def test_rows_made_before_tenants_go_to_the_default_tenant_and_survive_a_round_trip(stack):
    """Revision 0004 gives every existing dataset, job and task to the tenant "default", so whoever used the
    service before keys existed keeps it all (with a key for "default"); downgrading and upgrading again
    loses nothing."""
    downgrade(stack.database_url, "0003")
    with get_engine(stack.database_url).begin() as connection:
        connection.execute(
            text(
                "INSERT INTO datasets (name, filename, format, kind, num_examples, stats, sha256, "
                "records, created_at, idempotency_key) VALUES ('old', 'old.jsonl', 'jsonl', "
                "'classification', 2, '{}', 'x', :records, CURRENT_TIMESTAMP, 'k')"
            ),
            {"records": RECORDS},
        )
        connection.execute(
            text("INSERT INTO tasks (name, last_version, created_at) VALUES ('old', 3, CURRENT_TIMESTAMP)")
        )
    upgrade(stack.database_url)
    with get_engine(stack.database_url).connect() as connection:
        owner = connection.execute(text("SELECT id FROM tenants WHERE name = 'default'")).scalar_one()
        dataset = connection.execute(text("SELECT tenant_id, size_bytes FROM datasets")).one()
        assert dataset == (owner, len(RECORDS))
        assert connection.execute(text("SELECT tenant_id, last_version FROM tasks")).one() == (owner, 3)
    downgrade(stack.database_url, "0003")
    upgrade(stack.database_url)
    with get_engine(stack.database_url).connect() as connection:
        assert connection.execute(text("SELECT name FROM datasets")).scalar_one() == "old"
        assert connection.execute(text("SELECT name FROM tasks")).scalar_one() == "old"
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
