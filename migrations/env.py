"""Alembic environment: the URL comes from the application's settings unless the caller set one."""

from alembic import context

from app.config import get_settings
from app.db.models import Base
from app.db.session import get_engine

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().registry_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with get_engine(url).connect() as connection:
        # Batch mode lets later revisions alter columns on SQLite, which has no ALTER COLUMN.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
