from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.helpers import bearer, new_key, running, tune_here
from tests.stacks import STACK_PARAMS, make_stack


def pytest_generate_tests(metafunc):
    """A service rule is tested once, on the embedded stack. Tests marked ``servers`` (concurrency,
    locking, leases, the broker, migrations, one whole path per route family) also run on PostgreSQL and
    Redis, where those differ."""
    if "stack" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("servers") is not None
        metafunc.parametrize("stack", STACK_PARAMS if both else STACK_PARAMS[:1], indirect=True)


@pytest.fixture
def stack(request, tmp_path, migrated_templates):
    """A registry and broker of their own, migrated (a copy of the session's template)."""
    with make_stack(request.param, tmp_path, migrated_templates) as stack:
        yield stack


@pytest.fixture
def settings(stack, tmp_path, tiny_backbone_dir) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=stack.database_url,
        broker_url=stack.broker_url,
        queue_name=stack.queue_name,
        broker_key_prefix=stack.broker_key_prefix,
        # With PostgreSQL and Redis, tenants' request counts are shared through Redis, as across replicas.
        rate_limit_url=stack.broker_url if stack.broker_url.startswith("redis") else "",
        backbones={"tiny": str(tiny_backbone_dir)},
        default_backbone="tiny",
        device="cpu",
        max_new_tokens=64,
        max_input_tokens=256,
    )


@pytest.fixture
def api_key(stack) -> str:
    return new_key(stack, "acme")


@pytest.fixture
def client(settings, api_key):
    """The API as the tenant "acme" sees it."""
    with TestClient(create_app(settings), headers=bearer(api_key)) as client:
        yield client


@pytest.fixture
def trained(client, settings, tiny_backbone):
    """A task 'sst2' of the tenant "acme" with one version trained for a few steps, in this process."""
    return tune_here(client, settings, tiny_backbone, task="sst2")


@pytest.fixture
def server(settings):
    """The API over real HTTP on a free loopback port, in this process."""
    with running(create_app(settings)) as url:
        yield url
