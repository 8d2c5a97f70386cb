"""A job publishes a version only if it scores at least the bare template on the hold-out: otherwise the
job fails saying both scores, and the task gets no version."""

from __future__ import annotations

from app.services import training
from app.services.training import run_job
from tests.helpers import SENTIMENT, TEMPLATE, jsonl, upload


def _job_on_200_reviews(client) -> int:
    """A job whose hold-out (10 % of 200) is large enough for the rule."""
    records = [{"text": f"{text} ({i})", "label": label} for i in range(10) for text, label in SENTIMENT]
    dataset = upload(client, jsonl(records)).json()
    body = {
        "task": "held",
        "training_dataset": dataset["id"],
        "template": TEMPLATE,
        "num_virtual_tokens": 4,
        "hyperparameters": {"steps": 2, "batch_size": 4},
    }
    created = client.post("/v1/tuning/jobs", json=body)
    assert created.status_code == 201, created.text
    return created.json()["id"]


def test_a_job_that_scores_below_the_bare_template_publishes_nothing(
    client, settings, tiny_backbone, monkeypatch
):
    real = training.train_prompt

    def scored_below(*args, **kwargs):
        # The run is real; only its report is moved, so the bare template is ahead on the hold-out.
        result = real(*args, **kwargs)
        result.metrics.update(zero_shot_accuracy=result.metrics["val_accuracy"] + 0.1)
        return result

    monkeypatch.setattr(training, "train_prompt", scored_below)
    job_id = _job_on_200_reviews(client)
    assert run_job(db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone) == "failed"
    job = client.get(f"/v1/tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "below_zero_shot"
    assert "no version was published" in job["error"]["message"] and job["result"] is None
    assert job["metrics"]["zero_shot_accuracy"] > job["metrics"]["val_accuracy"]
    assert client.get("/v1/prompts/held").status_code == 404


def test_a_job_reports_the_bare_templates_hold_out_scores_beside_its_own(client, settings, tiny_backbone):
    job_id = _job_on_200_reviews(client)
    outcome = run_job(db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone)
    metrics = client.get(f"/v1/tuning/jobs/{job_id}").json()["metrics"]
    # Whichever way it went, it never published a version the template alone beats on the hold-out.
    if outcome == "succeeded":
        assert metrics["val_accuracy"] >= metrics["zero_shot_accuracy"]
        assert client.get("/v1/prompts/held/versions/1").json()["metrics"]["zero_shot_val_loss"] > 0
    else:
        assert metrics["val_accuracy"] < metrics["zero_shot_accuracy"]
    assert metrics["zero_shot_val_loss"] > 0 and metrics["best_step"] in (0, 2)
