"""Throw-away registries and brokers for tests: a SQLite file, or a fresh database on the PostgreSQL server
and a private key prefix on the Redis server. Each is removed when the test is done, so a later run never
meets leftovers.

The migrations run once per test session, into a template (MigratedTemplates): a test's SQLite registry is
a copy of the template file, and its PostgreSQL database is created from the template database, both
already at the newest revision."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import kombu
import psycopg
import pytest
import redis

POSTGRES_ADMIN_URL = os.environ.get(
    "SOFTPROMPT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SOFTPROMPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("SOFTPROMPT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")

# The two deployments; the ids appear in test names and in the summary. API tests run on the embedded one,
# and on both when marked `servers` (tests/api/conftest.py).
STACK_PARAMS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("servers", id="postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
]
# PostgreSQL with RabbitMQ as the broker, for the tests where brokers differ (workers killed, the broker
# restarted, long jobs). They share one RabbitMQ, which some of them restart or reconfigure, so they run one
# after another on one of the suite's processes.
RABBITMQ_PARAM = pytest.param(
    "rabbitmq",
    id="postgres+rabbitmq",
    marks=[pytest.mark.postgres, pytest.mark.rabbitmq, pytest.mark.xdist_group("rabbitmq")],
)
STACK_IDS = (*(param.id for param in STACK_PARAMS), RABBITMQ_PARAM.id)


@dataclass(frozen=True)
class Stack:
    name: str
    database_url: str
    broker_url: str
    queue_name: str
    broker_key_prefix: str

    def env(self) -> dict[str, str]:
        return {
            "SOFTPROMPT_DATABASE_URL": self.database_url,
            "SOFTPROMPT_BROKER_URL": self.broker_url,
            "SOFTPROMPT_QUEUE_NAME": self.queue_name,
            "SOFTPROMPT_BROKER_KEY_PREFIX": self.broker_key_prefix,
        }


class MigratedTemplates:
    """A registry of each kind at the newest revision, migrated once and copied per test: the migrations
    take about a second per test otherwise. The PostgreSQL template is made on first use and dropped by
    ``close``."""

    def __init__(self, directory: Path):
        self._directory = directory
        self._sqlite: Path | None = None
        self._postgres: str | None = None

    def sqlite_copy(self, target: Path) -> None:
        if self._sqlite is None:
            from app.db.migrate import upgrade
            from app.db.session import get_engine

            self._sqlite = self._directory / "template.sqlite"
            upgrade(f"sqlite:///{self._sqlite}")
            get_engine(f"sqlite:///{self._sqlite}").dispose()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._sqlite, target)

    def postgres_template(self) -> str:
        """The template database's name."""
        if self._postgres is None:
            from app.db.migrate import upgrade
            from app.db.session import get_engine

            name = f"softprompt_template_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
            self._postgres = name
            url = f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
            upgrade(url)
            get_engine(url).dispose()  # a template copied while a connection is open fails
        return self._postgres

    def close(self) -> None:
        if self._postgres is not None:
            with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self._postgres}" WITH (FORCE)')


@contextmanager
def embedded_stack(data_dir: Path, templates: MigratedTemplates | None = None) -> Iterator[Stack]:
    """The embedded default: SQLite registry and Celery's SQLAlchemy transport on SQLite (migrated when
    ``templates`` is given)."""
    if templates is not None:
        templates.sqlite_copy(data_dir / "softprompt.sqlite")
    yield Stack(
        name="embedded",
        database_url=f"sqlite:///{data_dir / 'softprompt.sqlite'}",
        broker_url=f"sqla+sqlite:///{data_dir / 'broker.sqlite'}",
        queue_name="softprompt",
        broker_key_prefix="",
    )


@contextmanager
def postgres_database(template: str | None = None) -> Iterator[str]:
    """A new database, empty or a copy of ``template``; dropped afterwards."""
    name = f"softprompt_test_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"{copy}')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        from app.db.session import get_engine

        for url in (f"{base}/{name}",):
            get_engine(url).dispose()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_namespace() -> Iterator[tuple[str, str, str]]:
    """(broker URL, queue name, key prefix) private to this test; its keys are deleted afterwards."""
    tag = uuid.uuid4().hex[:12]
    prefix = f"softprompt-test-{tag}:"
    try:
        yield REDIS_URL, f"softprompt-test-{tag}", prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*")) + list(
            client.scan_iter(match=f"*softprompt-test-{tag}*")
        )
        if keys:
            client.delete(*keys)
        client.close()


@contextmanager
def rabbitmq_queue() -> Iterator[tuple[str, str]]:
    """(broker URL, queue name) private to this test; the queue and its exchange are deleted afterwards."""
    queue = f"softprompt-test-{uuid.uuid4().hex[:12]}"
    try:
        yield RABBITMQ_URL, queue
    finally:
        with kombu.Connection(RABBITMQ_URL) as connection:
            channel = connection.default_channel
            channel.queue_delete(queue)
            channel.exchange_delete(queue)


@contextmanager
def server_stack(templates: MigratedTemplates | None = None, *, broker: str = "redis") -> Iterator[Stack]:
    """PostgreSQL registry and a Redis (or, with ``broker`` "rabbitmq", RabbitMQ) broker, as in production
    (migrated when ``templates`` is given)."""
    template = templates.postgres_template() if templates is not None else None
    with postgres_database(template) as database_url:
        if broker == "rabbitmq":
            with rabbitmq_queue() as (broker_url, queue):
                yield Stack("postgres+rabbitmq", database_url, broker_url, queue, broker_key_prefix="")
            return
        with redis_namespace() as (broker_url, queue, prefix):
            yield Stack("postgres+redis", database_url, broker_url, queue, broker_key_prefix=prefix)


def stack_of(kind: str) -> contextlib.AbstractContextManager[Stack | None]:
    """For tests that start processes: nothing for the embedded stack (its files live in the data
    directory), else the servers of ``kind`` ("servers": PostgreSQL + Redis, or "rabbitmq")."""
    if kind == "embedded":
        return contextlib.nullcontext()
    return server_stack(broker="rabbitmq" if kind == "rabbitmq" else "redis")


@contextmanager
def make_stack(kind: str, data_dir: Path, templates: MigratedTemplates | None = None) -> Iterator[Stack]:
    with embedded_stack(data_dir, templates) if kind == "embedded" else server_stack(templates) as stack:
        yield stack
