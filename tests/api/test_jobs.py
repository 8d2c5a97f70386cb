from __future__ import annotations

import pytest

from app.contract.hyperparameters import MAX_DEFAULT_STEPS, MIN_DEFAULT_STEPS, Hyperparameters, default_steps
from app.ml.trainer import TrainConfig
from tests.helpers import sentiment_file, upload


def create(client, headers=None, **body):
    return client.post("/v1/tuning/jobs", json=body, headers=headers or {})


@pytest.mark.servers
def test_job_gets_defaults_and_is_queued(client):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    response = create(
        client, task="sst2", training_dataset=dataset_id, template="Review: {input}\nSentiment:"
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["base_model"] == "tiny"
    assert job["init"] == {"strategy": "labels"}
    assert job["method"] == "prefix" and job["num_virtual_tokens"] == 10
    assert job["hyperparameters"]["steps"] == 100 and job["hyperparameters"]["learning_rate"] == 0.01
    assert job["hyperparameters"]["warmup_steps"] == 10  # 10 % of the steps unless given
    assert job["hyperparameters"]["loss"] == "tokens"
    stored = Hyperparameters.model_validate(job["hyperparameters"])
    assert not TrainConfig.of(stored, classification=True).label_loss
    assert job["progress"] == {"step": 0, "total_steps": 100, "eta_seconds": None}
    assert job["result"] is None and job["error"] is None
    assert client.get(f"/v1/tuning/jobs/{job['id']}").json()["id"] == job["id"]
    events = client.get(f"/v1/tuning/jobs/{job['id']}/events").json()
    assert [e["data"].get("status") for e in events] == ["queued"]


def test_each_method_gets_its_own_defaults_unless_told(client):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    prompt = create(client, task="p", training_dataset=dataset_id, method="prompt").json()
    assert prompt["num_virtual_tokens"] == 20 and prompt["hyperparameters"]["learning_rate"] == 0.03
    given = {"method": "prefix", "num_virtual_tokens": 7, "hyperparameters": {"learning_rate": 0.2}}
    prefix = create(client, task="q", training_dataset=dataset_id, **given).json()
    assert prefix["num_virtual_tokens"] == 7 and prefix["hyperparameters"]["learning_rate"] == 0.2


def test_the_default_length_grows_with_the_data_within_bounds():
    assert default_steps(18, 32) == MIN_DEFAULT_STEPS  # a small dataset still gets enough updates
    assert default_steps(2_000, 32) == 188  # 3 epochs
    assert default_steps(67_149, 32) == MAX_DEFAULT_STEPS  # full SST-2: capped


def test_the_label_loss_can_be_chosen(client):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    job = create(client, task="t", training_dataset=dataset_id, hyperparameters={"loss": "labels"}).json()
    assert job["hyperparameters"]["loss"] == "labels"
    assert TrainConfig.of(
        Hyperparameters.model_validate(job["hyperparameters"]), classification=True
    ).label_loss


def test_epochs_become_steps(client):
    dataset_id = upload(client, sentiment_file()).json()["id"]  # 20 examples, a 2-example hold-out
    job = create(
        client, task="t", training_dataset=dataset_id, hyperparameters={"epochs": 2, "batch_size": 4}
    ).json()
    assert job["hyperparameters"]["steps"] == 9  # ceil(2 * 18 / 4)
    assert job["hyperparameters"]["warmup_steps"] == 1  # round(0.9)


def test_invalid_jobs_name_the_field(client):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    cases = [
        ({"task": "Bad Name", "training_dataset": dataset_id}, 422, "task"),
        ({"task": "t", "training_dataset": 999}, 404, "training_dataset"),
        ({"task": "t", "training_dataset": dataset_id, "template": "no placeholder"}, 422, "template"),
        ({"task": "t", "training_dataset": dataset_id, "base_model": "gpt-9"}, 422, "base_model"),
        ({"task": "t", "training_dataset": dataset_id, "num_virtual_tokens": 0}, 422, "num_virtual_tokens"),
        (
            {"task": "t", "training_dataset": dataset_id, "hyperparameters": {"steps": 10**9}},
            422,
            "hyperparameters.steps",
        ),
        (
            {"task": "t", "training_dataset": dataset_id, "hyperparameters": {"lr": 1}},
            422,
            "hyperparameters.lr",
        ),
        ({"task": "t", "training_dataset": dataset_id, "init": {"strategy": "text"}}, 422, "init.text"),
        (
            {"task": "t", "training_dataset": dataset_id, "hyperparameters": {"loss": "hinge"}},
            422,
            "hyperparameters.loss",
        ),
        (  # BLEU scores generated text, not a label
            {"task": "t", "training_dataset": dataset_id, "hyperparameters": {"eval_metric": "bleu"}},
            422,
            "hyperparameters.eval_metric",
        ),
    ]
    for body, status, param in cases:
        response = create(client, **body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param, (body, response.json())
    assert client.get("/v1/tuning/jobs").json()["data"] == []


@pytest.mark.servers
def test_idempotency_key(client):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    key = {"Idempotency-Key": "abc-123"}
    first = create(client, headers=key, task="t", training_dataset=dataset_id)
    assert first.status_code == 201
    for _ in range(4):
        again = create(client, headers=key, task="t", training_dataset=dataset_id)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = create(client, headers=key, task="other", training_dataset=dataset_id)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert len(client.get("/v1/tuning/jobs").json()["data"]) == 1


@pytest.mark.servers
def test_cancel_queued_then_finished(client):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    job_id = create(client, task="t", training_dataset=dataset_id).json()["id"]
    cancelled = client.post(f"/v1/tuning/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/tuning/jobs/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    assert client.post("/v1/tuning/jobs/999/cancel").status_code == 404


@pytest.mark.servers
def test_events_stream_as_sse_until_the_job_ends(client):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    job_id = create(client, task="t", training_dataset=dataset_id).json()["id"]
    client.post(f"/v1/tuning/jobs/{job_id}/cancel")
    with client.stream(
        "GET", f"/v1/tuning/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    assert "event: status" in body and "event: end" in body and '"cancelled"' in body


def test_ids_and_counts_are_numbers_not_anything_that_converts_to_one(client):
    """`true` is not dataset 1, and "3" is not 3: a client's bug surfaces as a 422 naming the field."""
    dataset_id = upload(client, sentiment_file()).json()["id"]
    cases = [
        ({"training_dataset": True}, "training_dataset"),
        ({"training_dataset": str(dataset_id)}, "training_dataset"),
        ({"training_dataset": dataset_id, "num_virtual_tokens": True}, "num_virtual_tokens"),
        ({"training_dataset": dataset_id, "hyperparameters": {"steps": "10"}}, "hyperparameters.steps"),
        ({"training_dataset": dataset_id, "hyperparameters": {"seed": 1.0}}, "hyperparameters.seed"),
    ]
    for body, field in cases:
        refused = create(client, task="strict", **body)
        assert refused.status_code == 422, (body, refused.text)
        assert refused.json()["error"]["param"] == field, (body, refused.json())
    assert client.get("/v1/tuning/jobs").json()["data"] == []
    evaluation = client.post("/v1/evaluations", json={"dataset": True, "models": [None]})
    assert evaluation.status_code == 422 and evaluation.json()["error"]["param"] == "dataset"
