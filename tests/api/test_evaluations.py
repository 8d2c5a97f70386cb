"""Evaluation runs: a dataset scored by versions and the bare backbone, run as a worker runs them (in this
process), on both stacks: the figures a user reads, the row a misfit names, cancel, a lapsed lease."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app.db.models import Evaluation, utcnow
from app.db.session import session_scope
from app.services.evaluation import evaluating
from app.services.evaluation.evaluating import run_evaluation
from app.services.runs import leases
from app.services.tuning.training import run_job
from tests.helpers import SENTIMENT, TEMPLATE, jsonl, predictions, sentiment_file, upload


def evaluate(client, settings, backbone, **body) -> dict:
    """POST /v1/evaluations, run here as a worker would, then GET it."""
    created = client.post("/v1/evaluations", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "queued"
    outcome = run_evaluation(
        db_url=settings.registry_url, evaluation_id=created.json()["id"], backbone=backbone
    )
    assert outcome == "succeeded"
    return client.get(f"/v1/evaluations/{created.json()['id']}").json()


@pytest.mark.servers
def test_a_version_scores_what_classify_answers_row_by_row(client, settings, tiny_backbone, trained):
    test_set = upload(client, sentiment_file(), filename="test.jsonl").json()["id"]
    done = evaluate(client, settings, tiny_backbone, dataset=test_set, models=["sst2@1", "sst2", None])
    assert done["status"] == "succeeded" and done["progress"] == {"done": 60, "total": 60}
    assert [r["model"] for r in done["results"]] == ["sst2@1", "sst2@1", None]  # "sst2" pinned at creation

    one_by_one = [
        client.post("/v1/classify", json={"task": "sst2@1", "input": text}).json()["results"][0]["label"]
        for text, _ in SENTIMENT
    ]
    expected = sum(label == gold for label, (_, gold) in zip(one_by_one, SENTIMENT, strict=True)) / len(
        SENTIMENT
    )
    metrics = done["results"][0]["metrics"]
    assert metrics["accuracy"] == expected
    assert set(metrics) >= {"accuracy", "macro_f1", "per_label", "confusion_matrix"}
    assert sum(metrics["per_label"][label]["support"] for label in ("negative", "positive")) == 20

    rows = predictions(client, done["id"])
    assert [r["row"] for r in rows] == list(range(1, 21))
    assert [r["predictions"][0]["output"] for r in rows] == one_by_one
    assert rows[0]["expected"] == SENTIMENT[0][1] and len(rows[0]["predictions"]) == 3
    # The version lists the evaluations that include it; the task's list finds it too.
    assert client.get("/v1/prompts/sst2/versions/1").json()["evaluations"] == [done["id"]]
    assert [e["id"] for e in client.get("/v1/evaluations?task=sst2").json()["data"]] == [done["id"]]
    assert client.get("/v1/evaluations?task=other").json()["data"] == []


def test_generation_is_scored_against_every_reference(client, settings, tiny_backbone):
    train = upload(client, jsonl({"input": f"count {i}", "output": f"{i} {i + 1}"} for i in range(12)))
    job = client.post(
        "/v1/tuning/jobs",
        json={"task": "counter", "training_dataset": train.json()["id"], "hyperparameters": {"steps": 2}},
    ).json()
    assert run_job(db_url=settings.registry_url, job_id=job["id"], backbone=tiny_backbone) == "succeeded"
    test_set = upload(
        client,
        jsonl(
            {"input": f"count {i}", "references": [f"{i} {i + 1}", f"{i}, then {i + 1}"]} for i in range(5)
        ),
        filename="test.jsonl",
    ).json()
    assert test_set["kind"] == "references"

    done = evaluate(
        client, settings, tiny_backbone, dataset=test_set["id"], models=["counter", None], max_new_tokens=4
    )
    for result in done["results"]:
        assert set(result["metrics"]) >= {"exact_match", "f1", "bleu", "chrf", "rouge_l", "signatures"}
        assert result["metrics"]["signatures"]["bleu"].startswith("nrefs:2|")
    # Batched greedy decoding gives each row what /v1/generate gives it alone.
    rows = predictions(client, done["id"])
    for row in rows:
        alone = client.post(
            "/v1/generate", json={"task": "counter@1", "input": row["input"], "max_new_tokens": 4}
        ).json()["outputs"][0]["text"]
        assert row["predictions"][0]["output"] == alone.strip()
        assert row["expected"] == [f"{row['row'] - 1} {row['row']}", f"{row['row'] - 1}, then {row['row']}"]


def test_a_dataset_that_does_not_fit_is_refused_naming_the_row(client, trained):
    def refused(body: dict) -> dict:
        response = client.post("/v1/evaluations", json=body)
        assert response.status_code in (404, 422), response.text
        return {"status": response.status_code, **response.json()["error"]}

    unknown_label = upload(
        client, jsonl([{"text": "fine", "label": "positive"}] * 2 + [{"text": "meh", "label": "neutral"}])
    ).json()["id"]
    error = refused({"dataset": unknown_label, "models": [None, "sst2"]})
    assert (error["code"], error["param"], error["line"]) == ("dataset_does_not_fit", "models[1]", 3)
    assert "'neutral'" in error["message"]

    generation = upload(client, jsonl([{"input": "a", "output": "b"}] * 2)).json()["id"]
    error = refused({"dataset": generation, "models": ["sst2@1"]})
    assert (error["code"], error["param"], error["line"]) == ("dataset_does_not_fit", "models[0]", 1)

    reviews = upload(client, sentiment_file()).json()["id"]
    assert refused({"dataset": reviews, "models": [None]})["param"] == "template"
    assert refused({"dataset": reviews, "models": ["nope"]})["param"] == "models[0]"
    assert refused({"dataset": reviews, "models": ["sst2@9"]})["param"] == "models[0]"
    assert refused({"dataset": reviews, "models": ["sst2"] * 9})["param"] == "models"
    assert refused({"dataset": reviews, "models": []})["param"] == "models"
    assert refused({"dataset": 999, "models": ["sst2"]})["param"] == "dataset"
    # Nothing was queued by the refusals.
    assert client.get("/v1/evaluations").json()["data"] == []


def test_evaluation_rows_are_capped(client, settings, trained):
    reviews = upload(client, sentiment_file()).json()["id"]
    settings.max_evaluation_rows = 19
    response = client.post("/v1/evaluations", json={"dataset": reviews, "models": ["sst2"]})
    assert response.status_code == 422 and response.json()["error"]["param"] == "dataset"


def test_a_references_dataset_is_not_training_data(client):
    test_set = upload(client, jsonl([{"input": "a", "references": ["b"]}] * 2)).json()["id"]
    response = client.post("/v1/tuning/jobs", json={"task": "t", "training_dataset": test_set})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "training_dataset"


@pytest.mark.servers
def test_cancel_queued_and_running(client, settings, tiny_backbone, trained, monkeypatch):
    reviews = upload(client, sentiment_file()).json()["id"]
    queued = client.post("/v1/evaluations", json={"dataset": reviews, "models": ["sst2"]}).json()
    assert client.post(f"/v1/evaluations/{queued['id']}/cancel").json()["status"] == "cancelled"
    assert client.post(f"/v1/evaluations/{queued['id']}/cancel").status_code == 409
    assert (
        run_evaluation(db_url=settings.registry_url, evaluation_id=queued["id"], backbone=tiny_backbone)
        == "skipped"
    )

    running = client.post("/v1/evaluations", json={"dataset": reviews, "models": ["sst2", None]}).json()
    answer = evaluating._answer

    def cancel_while_running(*args, **kwargs):
        assert client.post(f"/v1/evaluations/{running['id']}/cancel").json()["status"] == "running"
        return answer(*args, **kwargs)

    monkeypatch.setattr(evaluating, "_answer", cancel_while_running)
    outcome = run_evaluation(
        db_url=settings.registry_url, evaluation_id=running["id"], backbone=tiny_backbone, chunk_rows=4
    )
    assert outcome == "cancelled"
    found = client.get(f"/v1/evaluations/{running['id']}").json()
    assert found["status"] == "cancelled" and all(r["metrics"] is None for r in found["results"])
    assert client.get(f"/v1/evaluations/{running['id']}/predictions").status_code == 409


@pytest.mark.servers
def test_a_lapsed_lease_is_run_again_from_the_start_and_counted_once(
    client, settings, tiny_backbone, trained
):
    reviews = upload(client, sentiment_file()).json()["id"]
    evaluation = client.post("/v1/evaluations", json={"dataset": reviews, "models": ["sst2"]}).json()
    # A worker claims it, reports some progress and dies: its lease lapses.
    assert leases.claim(
        db_url=settings.registry_url,
        job_id=evaluation["id"],
        worker="gone",
        lease_s=60,
        kind=leases.EVALUATIONS,
    )
    with session_scope(settings.registry_url) as session:
        session.execute(
            update(Evaluation)
            .where(Evaluation.id == evaluation["id"])
            .values(progress={"done": 8, "total": 20}, lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    sent = []
    reaped = leases.reap(settings, kind=leases.EVALUATIONS, enqueue=lambda _, i: sent.append(i))
    assert reaped.requeued == [evaluation["id"]] == sent

    # The dead worker's lease is gone: whatever it would write now is refused.
    assert not leases.renew(
        db_url=settings.registry_url,
        job_id=evaluation["id"],
        worker="gone",
        lease_s=60,
        kind=leases.EVALUATIONS,
    )
    assert run_evaluation(
        db_url=settings.registry_url, evaluation_id=evaluation["id"], backbone=tiny_backbone
    ) == ("succeeded")
    done = client.get(f"/v1/evaluations/{evaluation['id']}").json()
    assert done["attempts"] == 2 and done["progress"] == {"done": 20, "total": 20}
    assert done["results"][0]["metrics"]["per_label"]["positive"]["support"] == 10
    assert len(predictions(client, evaluation["id"])) == 20


def test_a_dataset_being_scored_cannot_be_deleted(client, trained):
    reviews = upload(client, sentiment_file()).json()["id"]
    client.post("/v1/evaluations", json={"dataset": reviews, "models": ["sst2"], "template": TEMPLATE})
    response = client.delete(f"/v1/datasets/{reviews}")
    assert response.status_code == 409 and response.json()["error"]["code"] == "dataset_in_use"


def test_a_generation_job_scores_its_hold_out_with_the_evaluation_metrics(client, settings, tiny_backbone):
    # 40 rows: 4 are held out, enough for a hold-out but too few for the below-the-template rule.
    train = upload(client, jsonl({"input": f"count {i}", "output": f"{i} {i + 1}"} for i in range(40)))
    body = {"task": "counter", "training_dataset": train.json()["id"], "hyperparameters": {"steps": 2}}
    default = client.post("/v1/tuning/jobs", json=body).json()
    assert default["hyperparameters"]["eval_metric"] == "rouge_l"
    chosen = client.post(
        "/v1/tuning/jobs", json={**body, "hyperparameters": {"steps": 2, "eval_metric": "bleu"}}
    ).json()
    for job in (default, chosen):
        assert run_job(db_url=settings.registry_url, job_id=job["id"], backbone=tiny_backbone) == "succeeded"
    metrics = client.get(f"/v1/tuning/jobs/{default['id']}").json()["metrics"]
    assert metrics["eval_metric"] == "rouge_l"
    for name in ("exact_match", "f1", "bleu", "chrf", "rouge_l"):
        assert 0 <= metrics[f"val_{name}"] <= 100 and 0 <= metrics[f"zero_shot_{name}"] <= 100, name
    version = client.get("/v1/prompts/counter/versions/1").json()
    assert version["metrics"]["val_rouge_l"] == metrics["val_rouge_l"]
    assert client.get(f"/v1/tuning/jobs/{chosen['id']}").json()["metrics"]["eval_metric"] == "bleu"


def test_a_task_filter_is_a_name_not_a_pattern(client, settings, tiny_backbone, trained):
    test_set = upload(client, sentiment_file(), filename="test.jsonl").json()["id"]
    evaluate(client, settings, tiny_backbone, dataset=test_set, models=["sst2@1"])
    assert len(client.get("/v1/evaluations", params={"task": "sst2"}).json()["data"]) == 1
    for pattern in ("%", "sst_", "s%"):
        assert client.get("/v1/evaluations", params={"task": pattern}).json()["data"] == [], pattern
