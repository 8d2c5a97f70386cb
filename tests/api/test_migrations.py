from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from app.db.models import Base
from app.db.session import get_engine


def test_the_migrations_build_exactly_the_models_tables(stack):
    """`softprompt db upgrade` on an empty database (the fixture ran it) gives what the code expects."""
    with get_engine(stack.database_url).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
