"""Throw-away registries and brokers for tests: a SQLite file, or a fresh database on the PostgreSQL server
and a private key prefix on the Redis server. Each is removed when the test is done, so a later run never
meets leftovers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

POSTGRES_ADMIN_URL = os.environ.get(
    "SOFTPROMPT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SOFTPROMPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# The two deployments every stack-aware test runs on; the ids appear in test names and in the summary.
STACK_PARAMS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("servers", id="postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
]
STACK_IDS = tuple(param.id for param in STACK_PARAMS)


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


@contextmanager
def embedded_stack(data_dir: Path) -> Iterator[Stack]:
    """The embedded default: SQLite registry and Celery's SQLAlchemy transport on SQLite."""
    yield Stack(
        name="embedded",
        database_url=f"sqlite:///{data_dir / 'softprompt.sqlite'}",
        broker_url=f"sqla+sqlite:///{data_dir / 'broker.sqlite'}",
        queue_name="softprompt",
        broker_key_prefix="",
    )


@contextmanager
def postgres_database() -> Iterator[str]:
    name = f"softprompt_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
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
def server_stack() -> Iterator[Stack]:
    """PostgreSQL registry and Redis broker, as in production."""
    with postgres_database() as database_url, redis_namespace() as (broker_url, queue, prefix):
        yield Stack(
            name="postgres+redis",
            database_url=database_url,
            broker_url=broker_url,
            queue_name=queue,
            broker_key_prefix=prefix,
        )


@contextmanager
def make_stack(kind: str, data_dir: Path) -> Iterator[Stack]:
    with embedded_stack(data_dir) if kind == "embedded" else server_stack() as stack:
        yield stack
