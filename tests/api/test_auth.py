"""Bearer keys, and the open loopback mode a person trying the service locally gets before any key exists."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from app.db.session import session_scope
from app.main import create_app
from app.services.tenancy.api_keys import revoke_key
from tests.helpers import bearer, new_key, sentiment_file, upload

CHALLENGE = 'Bearer realm="softprompt"'


def uncached(settings):
    """Key lookups not remembered at all, so a revoked or new key counts on the very next request."""
    return settings.model_copy(update={"auth_cache_ttl_s": 0.0})


@pytest.mark.servers
def test_missing_wrong_and_revoked_keys_get_401_with_a_challenge(settings, stack, caplog):
    key = new_key(stack, "acme")
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(uncached(settings))) as client:
        assert client.get("/v1/datasets", headers=bearer(key)).status_code == 200

        missing = client.get("/v1/datasets")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == CHALLENGE
        assert missing.json()["error"]["code"] == "unauthorized"
        assert "Authorization: Bearer" in missing.json()["error"]["message"]
        for wrong in (bearer(key[:-1] + "x"), {"Authorization": f"Basic {key}"}, {"Authorization": key}):
            refused = client.get("/v1/datasets", headers=wrong)
            assert refused.status_code == 401, wrong

        with session_scope(stack.database_url) as session:
            revoke_key(session, key_id=1)
        revoked = client.get("/v1/datasets", headers=bearer(key))
        assert revoked.status_code == 401
        assert revoked.headers["www-authenticate"] == f'{CHALLENGE}, error="invalid_token"'
        assert "revoked" in revoked.json()["error"]["message"]
    assert key not in caplog.text and key[:-1] not in caplog.text


def test_without_any_key_only_the_loopback_interface_is_served(settings, stack, caplog):
    app = create_app(uncached(settings))
    with TestClient(app, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000)) as local:
        assert "NO API KEYS EXIST" in caplog.text  # the loud notice at start-up
        made = upload(local, sentiment_file())
        assert made.status_code == 201
        assert local.get("/v1/datasets").json()["data"][0]["id"] == made.json()["id"]

        same_site = {"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}
        assert local.get("/v1/datasets", headers=same_site).status_code == 200  # the /docs page itself
        for refused in (
            TestClient(app, client=("192.0.2.10", 50000)).get("/v1/datasets"),
            local.get("/v1/datasets", headers={"X-Forwarded-For": "192.0.2.10"}),  # relayed by a proxy
            # A page on another site, through the user's own browser: by name (DNS rebinding) or by origin.
            local.get("/v1/datasets", headers={"Host": "evil.example:8000"}),
            local.post("/v1/tuning/jobs/1/cancel", headers={"Origin": "http://evil.example"}),
            local.get("/v1/datasets", headers={"Sec-Fetch-Site": "cross-site"}),
        ):
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == CHALLENGE
            assert "No API keys exist yet" in refused.json()["error"]["message"]

        # The first key ends the open mode; a key for "default" keeps what was made while it was open.
        key = new_key(stack, "default")
        assert local.get("/v1/datasets").status_code == 401
        assert local.get("/v1/datasets", headers=bearer(key)).json()["data"][0]["id"] == made.json()["id"]


def test_the_openapi_page_declares_bearer_keys_on_every_v1_route(client):
    spec = client.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["API key"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            expected = [{"API key": []}] if path.startswith("/v1") else None
            assert operation.get("security") == expected, (method, path)
            if path.startswith("/v1"):
                assert "401" in operation["responses"], (method, path)


@pytest.mark.servers
def test_an_open_event_stream_ends_when_its_key_is_revoked(settings, stack):
    key = new_key(stack, "acme")
    with TestClient(create_app(uncached(settings)), headers=bearer(key)) as client:
        dataset = upload(client, sentiment_file()).json()["id"]
        body = {"task": "t", "training_dataset": dataset, "template": "{input}"}
        job = client.post("/v1/tuning/jobs", json=body).json()["id"]  # stays queued: no worker here
        accept = {"Accept": "text/event-stream"}
        with client.stream("GET", f"/v1/tuning/jobs/{job}/events", headers=accept) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: status"
            with session_scope(stack.database_url) as session:
                revoke_key(session, key_id=1)
            rest = list(lines)  # the stream ends: the queued job alone would keep it open
    assert "event: error" in rest and any('"unauthorized"' in line for line in rest)
