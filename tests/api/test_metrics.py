"""Prometheus metrics on the API: requests by route template, the engine's queue time and batch sizes, and
inputs and tokens per tenant and task. `/metrics` is not public."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from tests.helpers import bearer


def scrape(client, token: str) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers=bearer(token))
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


@pytest.mark.servers
def test_requests_tasks_and_the_engine_are_measured(settings, api_key, trained):
    with TestClient(
        create_app(settings.model_copy(update={"metrics_token": "scrape-me"})), headers=bearer(api_key)
    ) as client:
        generated = client.post(
            "/v1/generate", json={"task": "sst2", "input": ["fine", "dull"], "max_new_tokens": 3}
        )
        assert generated.status_code == 200
        assert client.post("/v1/classify", json={"task": "sst2", "input": "fine"}).status_code == 200
        assert client.get("/v1/datasets/999").status_code == 404
        seen = scrape(client, "scrape-me")

    def value(name: str, **labels: str) -> float:
        return seen.get((name, tuple(sorted(labels.items()))), 0.0)

    tokens = generated.json()["usage"]["completion_tokens"]
    assert value("softprompt_generated_tokens_total", tenant="acme", task="sst2") == tokens > 0
    assert value("softprompt_inference_inputs_total", tenant="acme", task="sst2", route="generate") == 2
    assert value("softprompt_inference_inputs_total", tenant="acme", task="sst2", route="classify") == 1
    generate_route = {"method": "POST", "route": "/v1/generate"}
    assert value("softprompt_http_requests_total", **generate_route, status="200") == 1
    assert value("softprompt_http_request_duration_seconds_count", **generate_route) == 1
    # By template, not by raw path: an id never becomes a label of its own.
    assert (
        value("softprompt_http_requests_total", method="GET", route="/v1/datasets/{dataset_id}", status="404")
        == 1
    )
    assert not any("999" in str(labels) for _, labels in seen)
    assert value("softprompt_inference_queue_seconds_count") == 2  # both generated rows
    assert value("softprompt_engine_batch_rows_count") >= 2  # decoder steps after the prefill
    assert value("softprompt_engine_step_seconds_count") == value("softprompt_engine_batch_rows_count")


def test_metrics_are_not_served_to_others_without_the_token(client, settings):
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/metrics", headers=bearer("a-guess")).status_code == 401
    local = TestClient(create_app(settings), base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000))
    assert local.get("/metrics").status_code == 200
    assert local.get("/metrics", headers={"X-Forwarded-For": "192.0.2.1"}).status_code == 401


def test_task_series_are_capped_and_go_with_the_task(settings, api_key, trained):
    """Thousands of tasks must not make thousands of series: past the cap a task counts under "_other",
    and a task whose last version is deleted leaves /metrics."""
    capped = settings.model_copy(update={"metrics_token": "scrape-me", "metrics_max_task_series": 1})
    with TestClient(create_app(capped), headers=bearer(api_key)) as client:
        for task in ("sst2", None):  # the bare backbone is a series too: the second pair
            body = {"task": task, "input": "fine", "max_new_tokens": 2}
            assert client.post("/v1/generate", json=body).status_code == 200
        seen = scrape(client, "scrape-me")
        served = "softprompt_inference_inputs_total"
        inputs = {dict(labels)["task"] for name, labels in seen if name == served}
        assert inputs == {"sst2", "_other"}
        assert client.delete("/v1/prompts/sst2/versions/1").status_code == 204
        seen = scrape(client, "scrape-me")
        tasks = {dict(labels).get("task") for name, labels in seen if name.startswith("softprompt_")}
        assert "sst2" not in tasks and "_other" in tasks
