from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.migrate import upgrade
from app.main import create_app
from tests.stacks import STACK_PARAMS, make_stack


@pytest.fixture(params=STACK_PARAMS)
def stack(request, tmp_path):
    with make_stack(request.param, tmp_path) as stack:
        upgrade(stack.database_url)
        yield stack


@pytest.fixture
def settings(stack, tmp_path, tiny_backbone_dir) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=stack.database_url,
        broker_url=stack.broker_url,
        queue_name=stack.queue_name,
        broker_key_prefix=stack.broker_key_prefix,
        backbones={"tiny": str(tiny_backbone_dir)},
        default_backbone="tiny",
        device="cpu",
        max_new_tokens=64,
        max_input_tokens=256,
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as client:
        yield client
