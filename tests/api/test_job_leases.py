"""Job ownership: claims, leases, the reaper. A worker's death is played by letting its lease lapse."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import timedelta

import pytest
import torch
from sqlalchemy import update

from app.db.models import JobCheckpoint, TuningJob, utcnow
from app.db.session import session_scope
from app.ml.checkpoint import Checkpoint
from app.services.runs import leases
from app.services.runs import lifecycle as runs
from app.services.tuning import checkpoints, training
from app.services.tuning.training import run_job
from tests.helpers import sentiment_file, upload

pytestmark = pytest.mark.servers  # leases: claims and lapses race on each database


TEMPLATE = "Review: {input}\nSentiment:"


def _job(client, **hyperparameters) -> int:
    dataset_id = upload(client, sentiment_file()).json()["id"]
    body = {"task": "sst2", "training_dataset": dataset_id, "template": TEMPLATE}
    body["hyperparameters"] = hyperparameters or {"steps": 2}
    response = client.post("/v1/tuning/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _set(settings, job_id: int, **values) -> None:
    with session_scope(settings.registry_url) as session:
        session.execute(update(TuningJob).where(TuningJob.id == job_id).values(**values))


def _lapse(settings, job_id: int) -> None:
    """What a killed worker leaves: a running row whose lease nobody renews."""
    _set(settings, job_id, lease_expires_at=utcnow() - timedelta(seconds=1))


class _Broker:
    def __init__(self):
        self.sent: list[int] = []

    def __call__(self, settings, job_id: int) -> None:
        self.sent.append(job_id)


def test_only_one_of_two_claims_wins(client, settings):
    job_id = _job(client)
    assert leases.claim(db_url=settings.registry_url, job_id=job_id, worker="a", lease_s=60)
    assert not leases.claim(db_url=settings.registry_url, job_id=job_id, worker="b", lease_s=60)
    job = client.get(f"/v1/tuning/jobs/{job_id}").json()
    assert job["status"] == "running"
    assert leases.reap(settings, enqueue=_Broker()) == leases.Reaped()  # a live lease is left alone


def test_a_dead_workers_job_is_queued_again_until_the_attempt_limit_then_fails(client, settings):
    job_id, broker = _job(client), _Broker()
    for attempt in range(1, settings.job_max_attempts + 1):
        assert leases.claim(db_url=settings.registry_url, job_id=job_id, worker=f"w{attempt}", lease_s=60)
        _lapse(settings, job_id)
        reaped = leases.reap(settings, enqueue=broker)
        if attempt < settings.job_max_attempts:
            assert reaped.requeued == [job_id] and broker.sent[-1] == job_id
            assert client.get(f"/v1/tuning/jobs/{job_id}").json()["status"] == "queued"
    assert reaped.failed == [job_id]
    assert len(broker.sent) == settings.job_max_attempts - 1
    job = client.get(f"/v1/tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    assert str(settings.job_max_attempts) in job["error"]["message"]


def test_a_requeued_job_is_finished_by_the_next_worker(client, settings, tiny_backbone):
    job_id = _job(client)
    assert leases.claim(db_url=settings.registry_url, job_id=job_id, worker="killed", lease_s=60)
    _lapse(settings, job_id)
    assert leases.reap(settings, enqueue=_Broker()).requeued == [job_id]
    assert run_job(db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone) == "succeeded"
    assert [v["version"] for v in client.get("/v1/prompts/sst2").json()["versions"]] == [1]
    assert client.get(f"/v1/tuning/jobs/{job_id}").json()["attempts"] == 2


def test_a_lapsed_job_with_a_cancel_pending_is_cancelled_not_retried(client, settings):
    job_id, broker = _job(client), _Broker()
    leases.claim(db_url=settings.registry_url, job_id=job_id, worker="a", lease_s=60)
    assert client.post(f"/v1/tuning/jobs/{job_id}/cancel").status_code == 200
    _lapse(settings, job_id)
    assert leases.reap(settings, enqueue=broker).cancelled == [job_id] and broker.sent == []
    assert client.get(f"/v1/tuning/jobs/{job_id}").json()["status"] == "cancelled"


def test_a_queued_job_whose_message_was_lost_is_sent_again_once_per_interval(client, settings):
    job_id, broker = _job(client), _Broker()
    assert leases.reap(settings, enqueue=broker).resent == []  # just created: its message is on its way
    _lapse(settings, job_id)
    assert leases.reap(settings, enqueue=broker).resent == [job_id]
    assert leases.reap(settings, enqueue=broker).resent == []
    assert broker.sent == [job_id]


def test_a_worker_that_lost_its_lease_stops_and_writes_nothing(client, settings, tiny_backbone):
    job_id = _job(client, steps=100_000, batch_size=2)
    outcome: list[str] = []
    runner = threading.Thread(
        target=lambda: outcome.append(
            run_job(db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone, lease_s=0.3)
        )
    )
    runner.start()
    deadline = time.monotonic() + 30
    while client.get(f"/v1/tuning/jobs/{job_id}").json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _set(settings, job_id, worker="another-worker")  # the reaper re-queued it and another worker claimed it
    runner.join(timeout=30)
    assert outcome == ["lost"]
    job = client.get(f"/v1/tuning/jobs/{job_id}").json()
    assert job["status"] == "running" and job["result"] is None  # still the other worker's, untouched
    assert client.get("/v1/prompts/sst2").status_code == 404


def test_a_worker_shutting_down_hands_its_job_back_and_the_next_run_continues_it(
    client, settings, tiny_backbone
):
    job_id, steps = _job(client, steps=300, batch_size=2), 300

    def run() -> str:
        # Checkpoints are rarer than the run is long: the only one is the state saved at the hand-back.
        return run_job(
            db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone, checkpoint_every=10 * steps
        )

    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(run()))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while client.get(f"/v1/tuning/jobs/{job_id}").json()["progress"]["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        runs.HANDBACK.set()  # what SIGTERM does in a worker process
        runner.join(timeout=30)
    finally:
        runs.HANDBACK.clear()
    assert outcome == ["handed_back"]
    job = client.get(f"/v1/tuning/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["attempts"] == 0  # a hand-back is not a failed attempt
    events = client.get(f"/v1/tuning/jobs/{job_id}/events").json()
    handed_back_at = events[-1]["data"]["step"]
    assert 1 <= handed_back_at < steps
    with session_scope(settings.registry_url) as session:
        assert session.get(JobCheckpoint, job_id).step == handed_back_at

    assert leases.reap(settings, enqueue=(broker := _Broker())).resent == [job_id] == broker.sent
    assert run() == "succeeded"
    job = client.get(f"/v1/tuning/jobs/{job_id}").json()
    assert job["attempts"] == 1 and job["progress"]["step"] == steps
    events = client.get(f"/v1/tuning/jobs/{job_id}/events").json()
    assert [e["data"]["resumed_from_step"] for e in events if "resumed_from_step" in e["data"]] == [
        handed_back_at
    ]


def test_a_database_away_when_the_job_starts_delays_it_and_does_not_fail_it(
    client, settings, tiny_backbone, monkeypatch
):
    from sqlalchemy.exc import OperationalError

    job_id = _job(client)
    real_load = training.load_records
    outages = iter([True, True])  # the first two reads of the records find the database away

    def load_records(*args, **kwargs):
        if next(outages, False):
            raise OperationalError("SELECT records", {}, Exception("connection refused"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(training, "load_records", load_records)
    assert run_job(db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone) == "succeeded"
    job = client.get(f"/v1/tuning/jobs/{job_id}").json()
    assert job["attempts"] == 1 and job["error"] is None


def test_only_the_worker_holding_a_job_writes_its_checkpoint_and_the_end_removes_it(client, settings):
    """Checkpoints live in the registry, where every worker finds them; a worker that lost its job to
    another (a long outage, the reaper) must not overwrite the new owner's state."""
    job_id = _job(client)
    db = settings.registry_url
    assert leases.claim(db_url=db, job_id=job_id, worker="first", lease_s=60)
    state = Checkpoint(
        step=7,
        prompt=torch.ones(2, 3),
        optimizer={"state": {}, "param_groups": []},
        batch_rng=torch.zeros(4, dtype=torch.uint8),
        pending=[1, 2],
        losses=[0.5],
    )
    assert checkpoints.save_if_held(db_url=db, job_id=job_id, worker="first", checkpoint=state)
    _set(settings, job_id, worker="second")  # the reaper gave the job to another worker
    later = dataclasses.replace(state, step=9)
    assert not checkpoints.save_if_held(db_url=db, job_id=job_id, worker="first", checkpoint=later)
    with session_scope(db) as session:
        kept = checkpoints.load(session, job_id=job_id)
    assert kept.step == 7 and torch.equal(kept.prompt, state.prompt) and kept.pending == [1, 2]
    _set(settings, job_id, status="queued", worker=None)  # handed back, then cancelled while queued
    assert client.post(f"/v1/tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    with session_scope(db) as session:
        assert checkpoints.load(session, job_id=job_id) is None
