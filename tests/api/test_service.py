from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from app.main import create_app


@pytest.mark.servers
def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"backbone": True, "database": True}


def test_not_ready_when_the_database_is_unreachable(settings):
    settings.database_url = "postgresql://nobody@127.0.0.1:1/none"
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] is False
        response = client.get("/v1/datasets")
        assert response.status_code == 503 and response.json()["error"]["code"] == "database_unavailable"


def test_errors_have_one_shape(client):
    for response in (
        client.get("/v1/nothing"),
        client.post("/v1/generate", content=b"{not json"),
        client.get("/v1/datasets", params={"limit": 0}),
    ):
        error = response.json()["error"]
        assert response.status_code in (404, 422) and error["code"] and error["message"]


def test_every_route_is_documented(client):
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary") and operation.get("description"), (method, path)
            if path.startswith("/v1/"):
                assert any(code.startswith("4") for code in operation["responses"]), (method, path)
    for name in ("JobCreate", "GenerateRequest", "ClassifyRequest"):
        assert schema["components"]["schemas"][name].get("examples"), name
    assert client.get("/docs").status_code == 200


def test_a_full_inference_queue_answers_429_at_once(client):
    engine = client.app.state.serving.engine
    engine.max_batch_rows, engine.max_queued_rows = 1, 0  # room for one row in all
    body = {"task": None, "input": "hello", "max_new_tokens": 2}
    gate = threading.Event()
    busy = engine.call(lambda _: gate.wait(30), rows=0)  # the model is busy until the gate opens
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/v1/generate", json=body)
            deadline = time.monotonic() + 10
            while engine.outstanding_rows < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = client.post("/v1/generate", json=body)
            assert refused.status_code == 429
            assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["code"] == "overloaded"
            assert "queue is full" in refused.json()["error"]["message"]
            assert client.get("/readyz").status_code == 200
            gate.set()
            assert first.result(timeout=30).status_code == 200
    finally:
        gate.set()
        busy.result(timeout=30)


def test_every_answer_carries_a_request_id(client):
    mine = client.get("/healthz", headers={"X-Request-ID": "checkout-42"})
    assert mine.headers["x-request-id"] == "checkout-42"  # the caller's own, to follow it through the logs
    made = client.get("/v1/datasets/999")
    assert len(made.headers["x-request-id"]) == 32 and made.status_code == 404
    odd = client.get("/healthz", headers={"X-Request-ID": "no spaces\tor tabs please"})
    assert odd.headers["x-request-id"] != "no spaces\tor tabs please"  # replaced, never logged as sent
