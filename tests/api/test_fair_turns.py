"""Fair turns on the workers: the work a run may ask for is capped before it is accepted, a free worker takes
the run of the tenant served least, and a long run yields at its time slice when another tenant's run is
waiting, then goes on from where it stopped."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from app.db.models import JobCheckpoint
from app.db.session import session_scope
from app.main import create_app
from app.services.evaluation import evaluating
from app.services.evaluation.evaluating import run_evaluation
from app.services.runs import leases, turns
from app.services.tuning.training import run_job
from tests.helpers import TEMPLATE, bearer, new_key, predictions, sentiment_file, upload


@pytest.fixture
def other_tenant(stack, settings):
    """The API as a second tenant, "globex", sees it."""
    with TestClient(create_app(settings), headers=bearer(new_key(stack, "globex"))) as client:
        yield client


def _job(client, **hyperparameters) -> int:
    dataset_id = upload(client, sentiment_file()).json()["id"]
    body = {"task": "sst2", "training_dataset": dataset_id, "template": TEMPLATE}
    response = client.post("/v1/tuning/jobs", json={**body, "hyperparameters": hyperparameters})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_job_past_the_work_cap_is_refused_naming_the_steps(client, settings):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    body = {"task": "sst2", "training_dataset": dataset_id, "template": TEMPLATE}
    settings.max_job_train_tokens = 10_000
    fits = client.post("/v1/tuning/jobs", json={**body, "hyperparameters": {"steps": 10, "batch_size": 4}})
    assert fits.status_code == 201, fits.text
    response = client.post("/v1/tuning/jobs", json={**body, "hyperparameters": {"steps": 1000}})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "too_much_work" and error["param"] == "hyperparameters.steps"
    assert "SOFTPROMPT_MAX_JOB_TRAIN_TOKENS" in error["message"]


def test_an_evaluation_past_the_work_cap_is_refused_naming_the_field(client, settings, trained):
    reviews = upload(client, sentiment_file()).json()["id"]
    settings.max_evaluation_work = 20 * 2 * 2 - 1  # rows x models x labels, one short
    response = client.post("/v1/evaluations", json={"dataset": reviews, "models": ["sst2", None]})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "too_much_work"
    assert "SOFTPROMPT_MAX_EVALUATION_WORK" in response.json()["error"]["message"]
    assert client.post("/v1/evaluations", json={"dataset": reviews, "models": ["sst2"]}).status_code == 201


@pytest.mark.servers
def test_a_free_worker_takes_the_run_of_the_tenant_served_least(client, settings, other_tenant):
    db_url = settings.registry_url
    first, second, third = (_job(client, steps=2) for _ in range(3))
    assert turns.next_run(db_url=db_url, kind=leases.JOBS, preferred=first) == first
    assert leases.claim(db_url=db_url, job_id=first, worker="w1", lease_s=60)
    waiting = _job(other_tenant, steps=2)
    # acme has a run going: the next worker takes globex's, whichever message it was given.
    assert turns.next_run(db_url=db_url, kind=leases.JOBS, preferred=second) == waiting
    assert leases.claim(db_url=db_url, job_id=waiting, worker="w2", lease_s=60)
    # One run each going, and globex started last: acme's turn, its message's own row.
    assert turns.next_run(db_url=db_url, kind=leases.JOBS, preferred=third) == third
    assert turns.next_run(db_url=db_url, kind=leases.JOBS, preferred=waiting) == second


@pytest.mark.servers
def test_a_long_job_yields_to_another_tenants_run_and_goes_on_from_its_checkpoint(
    client, settings, tiny_backbone, other_tenant, monkeypatch
):
    db_url, steps = settings.registry_url, 400
    monkeypatch.setattr(turns, "WAITING_POLL_S", 0.0)
    long_job = _job(client, steps=steps, batch_size=2)
    # Nobody else waiting: the slice ends and the job keeps its worker.
    alone = _job(client, steps=20, batch_size=2)
    assert run_job(db_url=db_url, job_id=alone, backbone=tiny_backbone, time_slice_s=1e-6) == "succeeded"

    outcomes: list[str] = []
    runner = threading.Thread(
        target=lambda: outcomes.append(
            run_job(
                db_url=db_url,
                job_id=long_job,
                backbone=tiny_backbone,
                checkpoint_every=10 * steps,
                time_slice_s=1e-6,
            )
        )
    )
    runner.start()
    deadline = time.monotonic() + 30
    while client.get(f"/v1/tuning/jobs/{long_job}").json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    small = _job(other_tenant, steps=2)
    runner.join(timeout=60)
    outcome = outcomes[0]
    assert outcome == "yielded"
    job = client.get(f"/v1/tuning/jobs/{long_job}").json()
    assert job["status"] == "queued" and job["attempts"] == 0  # a turn given up is not a failed attempt
    event = client.get(f"/v1/tuning/jobs/{long_job}/events").json()[-1]
    assert "time slice" in event["message"] and event["data"]["yielded"] is True
    with session_scope(db_url) as session:
        saved_at = session.get(JobCheckpoint, long_job).step
    assert 1 <= saved_at < steps

    assert turns.next_run(db_url=db_url, kind=leases.JOBS, preferred=long_job) == small
    assert run_job(db_url=db_url, job_id=small, backbone=tiny_backbone) == "succeeded"
    assert run_job(db_url=db_url, job_id=long_job, backbone=tiny_backbone) == "succeeded"
    events = client.get(f"/v1/tuning/jobs/{long_job}/events").json()
    assert [e["data"]["resumed_from_step"] for e in events if "resumed_from_step" in e["data"]] == [saved_at]
    assert client.get(f"/v1/tuning/jobs/{long_job}").json()["progress"]["step"] == steps


@pytest.mark.servers
def test_an_evaluation_yields_and_goes_on_from_the_rows_already_scored(
    client, settings, tiny_backbone, trained, other_tenant, monkeypatch
):
    db_url = settings.registry_url
    monkeypatch.setattr(turns, "WAITING_POLL_S", 0.0)
    reviews = upload(client, sentiment_file()).json()["id"]
    body = {"dataset": reviews, "models": ["sst2", None]}
    whole = client.post("/v1/evaluations", json=body).json()["id"]
    assert run_evaluation(db_url=db_url, evaluation_id=whole, backbone=tiny_backbone, chunk_rows=4) == (
        "succeeded"
    )

    interrupted = client.post("/v1/evaluations", json=body).json()["id"]
    answer, calls = evaluating._answer, []

    def other_tenant_arrives(*args, **kwargs):
        calls.append(kwargs["first_row"])
        if len(calls) == 2:  # after two batches of four rows, another tenant queues a job
            _job(other_tenant, steps=2)
        return answer(*args, **kwargs)

    monkeypatch.setattr(evaluating, "_answer", other_tenant_arrives)
    outcome = run_evaluation(
        db_url=db_url, evaluation_id=interrupted, backbone=tiny_backbone, chunk_rows=4, time_slice_s=1e-6
    )
    assert outcome == "yielded" and calls == [0, 4]
    queued = client.get(f"/v1/evaluations/{interrupted}").json()
    assert queued["status"] == "queued" and queued["attempts"] == 0

    calls.clear()
    assert run_evaluation(db_url=db_url, evaluation_id=interrupted, backbone=tiny_backbone, chunk_rows=4) == (
        "succeeded"
    )
    # The first model's rows 9 to 20, then the second model's: no row scored twice.
    assert calls == [8, 12, 16, 0, 4, 8, 12, 16]
    done = client.get(f"/v1/evaluations/{interrupted}").json()
    assert done["attempts"] == 1 and done["progress"] == {"done": 40, "total": 40}
    assert done["results"] == client.get(f"/v1/evaluations/{whole}").json()["results"]
    assert predictions(client, interrupted) == predictions(client, whole)
