"""The tiers a version goes through on its way to the engine (app/services/serving/version_cache.py): a cold
version's first requests share one registry read, and every tier is counted on /metrics."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.db.models import Tenant
from app.db.session import session_scope
from app.main import create_app
from app.services.serving import serving as serving_module
from tests.api.test_metrics import scrape
from tests.helpers import adapter_zip, bearer

pytestmark = pytest.mark.servers  # single loads and the change mark, on each database


CONCURRENT = 16


def test_many_concurrent_requests_of_a_cold_version_read_the_registry_once(settings, api_key, monkeypatch):
    with TestClient(
        create_app(settings.model_copy(update={"metrics_token": "scrape-me"})), headers=bearer(api_key)
    ) as client:
        imported = client.post(
            "/v1/prompts/cold/versions",
            files={"file": ("a.zip", adapter_zip())},
            data={"template": "Review: {input}\nSentiment:"},
        )
        assert imported.status_code == 201, imported.text
        serving = client.app.state.serving
        reads, find_version = [], serving_module.prompts_service.find_version

        def slow_read(*args, **kwargs):
            reads.append(kwargs["ref"])
            time.sleep(0.3)  # long enough that every request arrives while the first read is under way
            return find_version(*args, **kwargs)

        monkeypatch.setattr(serving_module.prompts_service, "find_version", slow_read)
        tenant_id, start, resolved = _tenant_id(client), threading.Barrier(CONCURRENT), []

        def request() -> None:
            start.wait()
            resolved.append(serving.resolve_task(tenant_id=tenant_id, ref="cold@1"))

        threads = [threading.Thread(target=request) for _ in range(CONCURRENT)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        monkeypatch.undo()
        assert reads == ["cold@1"]
        assert len(resolved) == CONCURRENT and all(r is resolved[0] for r in resolved)

        generated = client.post("/v1/generate", json={"task": "cold@1", "input": "fine", "max_new_tokens": 2})
        assert generated.status_code == 200
        seen = scrape(client, "scrape-me")

    def value(name: str, **labels: str) -> float:
        return seen.get((name, tuple(sorted(labels.items()))), 0.0)

    events = "softprompt_version_cache_events_total"
    assert value(events, tier="names", event="miss") == CONCURRENT
    assert value(events, tier="names", event="load") == 1
    assert value(events, tier="names", event="hit") == 1  # the generation, within the TTL
    assert value(events, tier="prompts", event="load") == 1
    assert value(events, tier="keys_values", event="load") == 1
    assert value("softprompt_version_cache_bytes", tier="prompts") == 3 * 64 * 4  # [3, 64] float32
    assert value("softprompt_version_cache_bytes", tier="keys_values") > 0
    assert value("softprompt_version_cache_load_seconds_count", tier="names") == 1


def _tenant_id(client) -> int:
    with session_scope(client.app.state.settings.registry_url) as session:
        return session.query(Tenant).filter_by(name="acme").one().id


def test_names_stay_resolved_past_their_ttl_until_the_registry_changes(settings, api_key, monkeypatch):
    quick = settings.model_copy(update={"task_resolve_ttl_s": 0.05})
    with TestClient(create_app(quick), headers=bearer(api_key)) as client:

        def import_version(task: str) -> None:
            files = {"file": ("a.zip", adapter_zip())}
            imported = client.post(f"/v1/prompts/{task}/versions", files=files, data={"template": "{input}"})
            assert imported.status_code == 201, imported.text

        for task in ("alpha", "beta", "gamma"):
            import_version(task)
        serving, tenant_id = client.app.state.serving, _tenant_id(client)
        reads, find_version = [], serving_module.prompts_service.find_version

        def counted(*args, **kwargs):
            reads.append(kwargs["ref"])
            return find_version(*args, **kwargs)

        monkeypatch.setattr(serving_module.prompts_service, "find_version", counted)
        for _ in range(3):
            for task in ("alpha", "beta", "gamma"):
                assert serving.resolve_task(tenant_id=tenant_id, ref=task).version == 1
            time.sleep(0.1)  # past the TTL: the mark is read again, and has not changed
        assert sorted(reads) == ["alpha", "beta", "gamma"]

        import_version("alpha")
        time.sleep(0.1)
        assert serving.resolve_task(tenant_id=tenant_id, ref="alpha").version == 2
        assert client.delete("/v1/prompts/beta/versions/1").status_code in (200, 204)
        time.sleep(0.1)
        assert client.post("/v1/generate", json={"task": "beta@1", "input": "x"}).status_code == 404
