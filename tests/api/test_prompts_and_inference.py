"""Registry and inference routes. The job is trained by calling the worker's service function in this
process; the real worker process is exercised in tests/integration."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import update

from app.db.models import JobCheckpoint, PromptVersion, TuningJob
from app.db.session import session_scope
from app.ml import inference
from app.services.tuning import checkpoints
from app.services.tuning.training import run_job
from tests.helpers import TEMPLATE, sentiment_file, stored_prompt, upload


def test_finished_job_reports_its_version(client, trained):
    job = client.get(f"/v1/tuning/jobs/{trained['id']}").json()
    assert job["status"] == "succeeded" and job["result"] == {"task": "sst2", "version": 1}
    assert job["progress"]["step"] == 3 and job["metrics"]["train_loss"] is not None
    kinds = [e["type"] for e in client.get(f"/v1/tuning/jobs/{trained['id']}/events").json()]
    assert kinds[0] == "status" and "progress" in kinds and kinds[-1] == "status"


@pytest.mark.servers
def test_a_second_delivery_writes_nothing(client, settings, trained, tiny_backbone):
    assert run_job(db_url=settings.registry_url, job_id=trained["id"], backbone=tiny_backbone) == "skipped"
    assert [v["version"] for v in client.get("/v1/prompts/sst2").json()["versions"]] == [1]


def test_registry_describes_the_version(client, trained):
    version = client.get("/v1/prompts/sst2/versions/1").json()
    assert version["template"] == TEMPLATE and version["labels"] == ["negative", "positive"]
    assert version["num_virtual_tokens"] == 4 and version["base_model"] == "tiny"
    assert version["source_job"] == trained["id"] and len(version["sha256"]) == 64
    assert client.get("/v1/prompts").json()["data"][0]["latest_version"] == 1
    assert client.get("/v1/prompts/sst2/versions/2").status_code == 404
    assert client.get("/v1/prompts/nope").status_code == 404


@pytest.mark.servers
def test_a_new_version_is_served_without_a_restart(client, settings, trained, tiny_backbone):
    body = {"task": "sst2", "input": "a wonderful, moving film"}
    assert client.post("/v1/classify", json=body).json()["version"] == 1
    second = client.post(
        "/v1/tuning/jobs",
        json={
            "task": "sst2",
            "training_dataset": trained["training_dataset"],
            "template": TEMPLATE,
            "num_virtual_tokens": 6,
            "hyperparameters": {"steps": 2, "batch_size": 4, "seed": 1},
        },
    ).json()
    assert run_job(db_url=settings.registry_url, job_id=second["id"], backbone=tiny_backbone) == "succeeded"
    time.sleep(settings.task_resolve_ttl_s)  # "sst2" may name version 1 for this long, no longer
    served = client.post("/v1/generate", json={**body, "max_new_tokens": 2}).json()
    assert served["version"] == 2
    assert client.post("/v1/classify", json=body).json()["version"] == 2
    assert client.post("/v1/classify", json={**body, "task": "sst2@1"}).json()["version"] == 1


@pytest.mark.servers
def test_classify_matches_the_model_with_the_stored_prompt(client, settings, trained, tiny_backbone):
    inputs = ["a wonderful, moving film", "dull and far too long", "ok"]
    response = client.post("/v1/classify", json={"task": "sst2", "input": inputs})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "sst2" and body["version"] == 1
    expected = inference.classify(
        tiny_backbone,
        prompts=[stored_prompt(settings)] * 3,
        texts=[TEMPLATE.replace("{input}", t) for t in inputs],
        labels=["negative", "positive"],
    )
    for result, scores in zip(body["results"], expected, strict=True):
        assert result["scores"] == pytest.approx(scores, abs=1e-5)
        assert result["label"] == max(scores, key=scores.get)
    rendered = [TEMPLATE.replace("{input}", t) for t in inputs]
    assert body["usage"]["prompt_tokens"] == sum(
        len(tiny_backbone.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in rendered
    )
    pinned = client.post("/v1/classify", json={"task": "sst2@1", "input": inputs[0]}).json()
    assert pinned["results"][0]["scores"] == pytest.approx(body["results"][0]["scores"], abs=1e-5)


def test_generate_matches_the_no_cache_reference(client, settings, trained, tiny_backbone):
    response = client.post(
        "/v1/generate", json={"task": "sst2", "input": ["great film", "bad"], "max_new_tokens": 6}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == 1 and len(body["outputs"]) == 2
    prompt = stored_prompt(settings)
    for text, output in zip(["great film", "bad"], body["outputs"], strict=True):
        tokens = inference.generate_reference(
            tiny_backbone, prompt=prompt, text=TEMPLATE.replace("{input}", text), max_new_tokens=6
        )
        eos = tiny_backbone.eos_token_id
        expected = tokens[: tokens.index(eos)] if eos in tokens else tokens
        assert output["text"] == tiny_backbone.tokenizer.decode(expected)
        assert output["tokens"] == len(expected)  # the end-of-sequence token is not counted
        assert output["finish_reason"] == ("stop" if eos in tokens else "length")
    assert body["usage"]["completion_tokens"] == sum(o["tokens"] for o in body["outputs"])
    assert body["usage"]["prompt_tokens"] > 0


def test_bare_backbone_and_streaming(client):
    body = client.post("/v1/generate", json={"task": None, "input": "hello", "max_new_tokens": 3}).json()
    assert body["task"] is None and body["version"] is None and len(body["outputs"]) == 1
    request = {"input": ["hello", "the film is"], "max_new_tokens": 6}
    whole = client.post("/v1/generate", json=request).json()
    with client.stream("POST", "/v1/generate", json={**request, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events("".join(response.iter_text()))
    tokens = [data for name, data in events if name == "token"]
    assert len(tokens) > 2, "text arrives piece by piece, not once at the end"
    for index, output in enumerate(whole["outputs"]):
        assert "".join(t["text"] for t in tokens if t["index"] == index) == output["text"]
    assert sorted((d["index"], d["text"]) for name, d in events if name == "output") == [
        (i, o["text"]) for i, o in enumerate(whole["outputs"])
    ]
    assert events[-1] == ("done", whole)


def _sse_events(raw: str) -> list[tuple[str, dict]]:
    events = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_inference_limits_and_unknown_tasks(client, trained):
    cases = [
        ({"task": "missing", "input": "x"}, 404, "task"),
        ({"task": "sst2@7", "input": "x"}, 404, "task"),
        ({"task": "Not A Task", "input": "x"}, 422, "task"),
        ({"task": "sst2", "input": "x", "max_new_tokens": 65}, 422, "max_new_tokens"),
        ({"task": "sst2", "input": "word " * 400}, 422, "input"),
        ({"task": "sst2", "input": []}, 422, "input"),
    ]
    for body, status, param in cases:
        response = client.post("/v1/generate", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param
    too_long = client.post("/v1/generate", json={"task": "sst2", "input": "word " * 400}).json()["error"]
    assert "256" in too_long["message"]  # names the limit
    response = client.post("/v1/classify", json={"task": None, "input": "x"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "labels"


def test_corrupt_version_fails_only_its_own_requests(client, settings, trained):
    with session_scope(settings.registry_url) as session:
        session.execute(update(PromptVersion).values(vectors=b"garbage"))
    response = client.post("/v1/classify", json={"task": "sst2", "input": "x"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "prompt_corrupt"
    ok = client.post("/v1/classify", json={"task": None, "input": "x", "labels": ["a", "b"]})
    assert ok.status_code == 200


@pytest.mark.servers
def test_delete_version_keeps_numbers_unique(client, settings, trained, tiny_backbone):
    assert client.delete("/v1/prompts/sst2/versions/1").status_code == 204
    assert client.post("/v1/classify", json={"task": "sst2", "input": "x"}).status_code == 404
    dataset_id = trained["training_dataset"]
    job = client.post(
        "/v1/tuning/jobs",
        json={"task": "sst2", "training_dataset": dataset_id, "hyperparameters": {"steps": 1}},
    ).json()
    run_job(db_url=settings.registry_url, job_id=job["id"], backbone=tiny_backbone)
    assert client.get("/v1/prompts/sst2").json()["latest_version"] == 2


def test_generation_task_round_trip(client, settings, tiny_backbone):
    records = [{"input": f"count {i}", "output": f"{i} {i + 1}"} for i in range(12)]
    content = "\n".join(json.dumps(r) for r in records).encode()
    dataset = upload(client, content, filename="gen.jsonl").json()
    assert dataset["kind"] == "generation"
    job = client.post(
        "/v1/tuning/jobs",
        json={"task": "counter", "training_dataset": dataset["id"], "hyperparameters": {"steps": 2}},
    ).json()
    assert job["init"] == {"strategy": "vocab"}
    assert run_job(db_url=settings.registry_url, job_id=job["id"], backbone=tiny_backbone) == "succeeded"
    version = client.get("/v1/prompts/counter/versions/1").json()
    assert version["kind"] == "generation" and version["labels"] is None
    body = client.post(
        "/v1/generate", json={"task": "counter", "input": "count 3", "max_new_tokens": 4}
    ).json()
    assert body["version"] == 1 and body["outputs"][0]["finish_reason"] in ("stop", "length")
    response = client.post("/v1/classify", json={"task": "counter", "input": "count 3"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "labels"


class _WorkerKilled(BaseException):
    """Stands for SIGKILL: nothing in the job's code catches it."""


@pytest.mark.servers
def test_a_job_whose_worker_died_resumes_from_its_checkpoint_and_ends_as_if_unbroken(
    client, settings, tiny_backbone, monkeypatch
):
    dataset_id = upload(client, sentiment_file()).json()["id"]
    body = {"training_dataset": dataset_id, "template": TEMPLATE, "hyperparameters": {"steps": 6}}
    broken, unbroken = (client.post("/v1/tuning/jobs", json={**body, "task": t}).json() for t in ("a", "b"))
    run = dict(db_url=settings.registry_url, backbone=tiny_backbone, checkpoint_every=2)

    real_save = checkpoints.save_if_held

    def save_then_die(**saving):
        real_save(**saving)
        if saving["checkpoint"].step == 4:
            raise _WorkerKilled

    monkeypatch.setattr(checkpoints, "save_if_held", save_then_die)
    with pytest.raises(_WorkerKilled):
        run_job(job_id=broken["id"], **run)
    monkeypatch.setattr(checkpoints, "save_if_held", real_save)
    with session_scope(settings.registry_url) as session:  # what the reaper does with an expired lease
        assert session.get(JobCheckpoint, broken["id"]).step == 4
        session.execute(update(TuningJob).where(TuningJob.id == broken["id"]).values(status="queued"))

    assert run_job(job_id=broken["id"], **run) == "succeeded"
    assert run_job(job_id=unbroken["id"], **run) == "succeeded"
    events = client.get(f"/v1/tuning/jobs/{broken['id']}/events").json()
    assert any(e["data"].get("resumed_from_step") == 4 for e in events)
    with session_scope(settings.registry_url) as session:  # finished jobs leave no checkpoint behind
        assert session.query(JobCheckpoint).count() == 0
    with session_scope(settings.registry_url) as session:
        vectors = {v.task.name: v.vectors for v in session.query(PromptVersion)}
    assert vectors["a"] == vectors["b"]
