from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.api.body_limit import MULTIPART_OVERHEAD, BodyLimit
from app.config import Settings
from app.db.models import Dataset
from app.db.session import session_scope
from app.services.tenancy import idempotency
from tests.helpers import sentiment_file, upload


@pytest.mark.servers
def test_upload_returns_the_described_dataset(client):
    response = upload(client, sentiment_file(), name="reviews")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "reviews"
    assert body["format"] == "jsonl" and body["kind"] == "classification"
    assert body["num_examples"] == 20
    assert body["labels"] == ["negative", "positive"]
    assert body["stats"]["label_counts"] == {"negative": 10, "positive": 10}
    assert body["stats"]["input_tokens"]["max"] > 0  # counted with the default backbone's tokenizer
    assert client.get(f"/v1/datasets/{body['id']}").json() == body


def test_a_retried_upload_with_its_idempotency_key_stores_one_dataset(client):
    key = {"Idempotency-Key": "upload-reviews-1"}
    files = {"file": ("train.jsonl", sentiment_file())}
    first = client.post("/v1/datasets", files=files, data={"name": "reviews"}, headers=key)
    assert first.status_code == 201, first.text
    for _ in range(4):
        again = client.post("/v1/datasets", files=files, data={"name": "reviews"}, headers=key)
        assert again.status_code == 200 and again.json() == first.json()
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [first.json()["id"]]
    other = client.post("/v1/datasets", files={"file": ("train.jsonl", b"x")}, headers=key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.servers
def test_an_upload_that_loses_a_race_for_its_idempotency_key_returns_the_winners_dataset(client, settings):
    key = {"Idempotency-Key": "upload-reviews-race"}
    first = client.post("/v1/datasets", files={"file": ("train.jsonl", sentiment_file())}, headers=key).json()
    with session_scope(settings.registry_url) as session:
        winner = session.get(Dataset, first["id"])
        # What a second request with the same key inserts when it checked for the key before the first
        # committed: the unique key refuses it, and it answers with the first request's dataset.
        loser = Dataset(**{c.key: getattr(winner, c.key) for c in Dataset.__table__.columns if c.key != "id"})
        stored, created = idempotency.insert(session, loser)
        assert (stored.id, created) == (first["id"], False)
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [first["id"]]


def test_csv_generation_dataset(client):
    content = b"input,output\r\nTranslate: cat,chat\r\nTranslate: dog,chien\r\n"
    body = upload(client, content, filename="pairs.csv").json()
    assert body["format"] == "csv" and body["kind"] == "generation" and body["labels"] is None


def test_bad_file_names_line_and_stores_nothing(client):
    content = b'{"text": "fine", "label": "positive"}\n{"text": "broken", "label": \n'
    response = upload(client, content)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and error["line"] == 2
    assert client.get("/v1/datasets").json() == {"data": [], "has_more": False}


def test_missing_file_part_and_wrong_format(client):
    response = client.post("/v1/datasets", data={"name": "x"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "file"
    assert response.json()["error"]["code"] == "missing_file"
    response = upload(client, b"a,b\n", filename="data.xlsx")
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_format"


def test_upload_over_the_size_limit_is_413(client, settings):
    settings.max_upload_bytes = 100
    response = upload(client, sentiment_file())
    assert response.status_code == 413
    assert "100 bytes" in response.json()["error"]["message"]


def test_an_upload_declared_over_the_limit_is_refused_before_its_body_is_read(client, settings):
    settings.max_upload_bytes = 100
    response = upload(client, b"x" * 200_000)  # past the limit and the multipart allowance
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    assert "100 bytes" in response.json()["error"]["message"]


def test_a_chunked_upload_is_cut_off_once_it_passes_the_limit(client, settings):
    settings.max_upload_bytes = 100

    def chunks():  # no Content-Length: the size is only known while it arrives
        yield b"--b\r\nContent-Disposition: form-data; name=file; filename=a.jsonl\r\n\r\n"
        for _ in range(1000):
            yield b"x" * 1024

    response = client.post(
        "/v1/datasets", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    assert client.get("/v1/datasets").json()["data"] == []


def test_a_json_body_over_the_request_limit_is_413(client, settings):
    settings.max_request_bytes = 1000
    response = client.post("/v1/classify", json={"task": "x", "input": "y" * 2000})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert "1000 bytes" in response.json()["error"]["message"]


def test_list_is_paginated_newest_first(client):
    ids = [upload(client, sentiment_file(), name=f"d{i}").json()["id"] for i in range(3)]
    first = client.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = client.get("/v1/datasets", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert [d["id"] for d in second["data"]] == [ids[0]] and second["has_more"] is False


def test_delete_and_unknown_ids(client):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    response = client.get(f"/v1/datasets/{dataset_id}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 404


@pytest.mark.servers
def test_delete_refused_while_a_job_uses_it(client):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    job = client.post("/v1/tuning/jobs", json={"task": "s", "training_dataset": dataset_id}).json()
    response = client.delete(f"/v1/datasets/{dataset_id}")
    assert response.status_code == 409 and str(job["id"]) in response.json()["error"]["message"]
    client.post(f"/v1/tuning/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204


def test_the_body_limit_stops_reading_as_soon_as_the_limit_is_passed():
    """The test client reads a request body whole before the app sees it, so this drives the middleware
    directly with a body that arrives in 1 KiB pieces: reading stops just past the limit."""
    reads, sent = 0, []

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 1024, "more_body": reads < 1000}

    async def send(message):
        sent.append(message)

    async def reads_everything(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = BodyLimit(reads_everything, Settings(max_upload_bytes=100))
    scope = {"type": "http", "path": "/v1/datasets", "headers": [], "method": "POST"}
    asyncio.run(limited(scope, receive, send))
    assert sent[0]["status"] == 413
    assert reads == (100 + MULTIPART_OVERHEAD) // 1024 + 1


async def _reads_everything(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    ("pause_s", "settings"),
    [
        (10.0, Settings(body_idle_timeout_s=0.2)),  # a body that stops arriving
        (0.05, Settings(body_idle_timeout_s=1.0, body_deadline_s=0.3)),  # a trickle that never ends
    ],
)
def test_a_body_that_stops_or_trickles_is_408_and_its_connection_closed(pause_s, settings):
    """A client sending a large upload a few bytes at a time held its connection for as long as it liked."""
    sent, reads = [], 0

    async def trickle():
        nonlocal reads
        reads += 1
        if reads > 1:
            await asyncio.sleep(pause_s)
        return {"type": "http.request", "body": b"x" * 10, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/datasets", "headers": [], "method": "POST"}
    started = time.monotonic()
    asyncio.run(BodyLimit(_reads_everything, settings)(scope, trickle, send))
    assert time.monotonic() - started < 2
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert b'"code":"body_timeout"' in sent[1]["body"]


def test_once_the_body_is_in_waiting_for_a_disconnect_has_no_timeout():
    """An event stream or a long generation waits on receive() for the client to go; that is no body."""
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(0.5)  # longer than the idle timeout below
        return {"type": "http.disconnect"}

    async def waits_for_disconnect(scope, receive, send):
        await receive()
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/generate", "headers": [], "method": "POST"}
    asyncio.run(BodyLimit(waits_for_disconnect, Settings(body_idle_timeout_s=0.1))(scope, receive, send))
    assert sent[0]["status"] == 200


@pytest.mark.servers
def test_a_dataset_deleted_while_a_run_on_it_is_created_is_never_both_deleted_and_used(client):
    """The delete's in-use check and the run's creation are serialised: one of them wins, the other is
    refused (409 in use, or 404 gone), never both succeeding and never a 5xx."""
    runs = {
        "/v1/evaluations": lambda dataset: {"dataset": dataset, "models": [None], "template": "{input}"},
        "/v1/tuning/jobs": lambda dataset: {"task": "race", "training_dataset": dataset},
    }
    for attempt in range(12):
        route, body = list(runs.items())[attempt % 2]
        dataset = upload(client, sentiment_file()).json()["id"]
        start, answers = threading.Barrier(2), {}

        def delete(dataset=dataset, start=start, answers=answers):
            start.wait()
            answers["delete"] = client.delete(f"/v1/datasets/{dataset}")

        def create(dataset=dataset, start=start, answers=answers, route=route, body=body):
            start.wait()
            answers["create"] = client.post(route, json=body(dataset))

        threads = [threading.Thread(target=delete), threading.Thread(target=create)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        deleted, created = answers["delete"], answers["create"]
        codes = (deleted.status_code, created.status_code)
        assert codes in {(204, 404), (409, 201)}, (route, deleted.text, created.text)
        if created.status_code == 201:  # out of the tenant's active-run quota for the next attempt
            client.post(f"{route}/{created.json()['id']}/cancel")
            assert client.get(f"/v1/datasets/{dataset}").status_code == 200
