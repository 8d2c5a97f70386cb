"""A job publishes a version unless the bare template beats it on the hold-out beyond the hold-out's noise
(a paired sign test, app/ml/versus_bare.py): then the job fails saying both scores and how sure the rule
was, and the task gets no version. A lead of a row or two is noise: the version is published with both
scores and the verdict."""

from __future__ import annotations

import torch

from app.contract.kinds import EvalMetric
from app.ml.versus_bare import compare
from app.services.tuning import training
from app.services.tuning.training import run_job
from tests.helpers import SENTIMENT, TEMPLATE, jsonl, upload


def _job_on_200_reviews(client) -> int:
    """A job with a hold-out of 20 rows (10 % of 200)."""
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


def _reported_as(monkeypatch, *, prompt_right: list[float], bare_right: list[float]) -> None:
    """The run is real; only its report is moved to these hold-out rows (1.0 right, 0.0 wrong)."""
    real = training.train_prompt

    def moved(*args, **kwargs):
        result = real(*args, **kwargs)
        result.versus_bare = compare(prompt_right, bare_right, EvalMetric.ACCURACY)
        result.metrics.update(
            val_accuracy=sum(prompt_right) / len(prompt_right),
            zero_shot_accuracy=sum(bare_right) / len(bare_right),
            zero_shot_test=result.versus_bare.as_metrics(),
        )
        return result

    monkeypatch.setattr(training, "train_prompt", moved)


def test_a_job_the_bare_template_beats_beyond_noise_publishes_nothing(
    client, settings, tiny_backbone, monkeypatch
):
    # The bare template right on 8 rows the prompt got wrong, the prompt on none it got wrong.
    _reported_as(monkeypatch, prompt_right=[1.0] * 10 + [0.0] * 10, bare_right=[1.0] * 18 + [0.0] * 2)
    job_id = _job_on_200_reviews(client)
    assert run_job(db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone) == "failed"
    job = client.get(f"/v1/tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "below_zero_shot"
    message = job["error"]["message"]
    assert "accuracy 0.500" in message and "(0.900)" in message, message
    assert "scored better on 8 and the prompt on 0" in message and "probability 0.00391" in message
    assert "no version was published" in message and job["result"] is None
    assert job["metrics"]["zero_shot_test"]["worse"] and job["metrics"]["zero_shot_test"]["rows"] == 20
    assert client.get("/v1/prompts/held").status_code == 404


def test_a_lead_of_one_row_is_noise_and_the_version_says_so(client, settings, tiny_backbone, monkeypatch):
    # 0.800 against 0.850 on 20 rows: the bare template right on one more row.
    _reported_as(monkeypatch, prompt_right=[1.0] * 16 + [0.0] * 4, bare_right=[1.0] * 17 + [0.0] * 3)
    job_id = _job_on_200_reviews(client)
    assert run_job(db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone) == "succeeded"
    version = client.get("/v1/prompts/held/versions/1").json()
    metrics = version["metrics"]
    assert (metrics["val_accuracy"], metrics["zero_shot_accuracy"]) == (0.8, 0.85)
    verdict = metrics["zero_shot_test"]
    assert not verdict["worse"] and verdict["bare_better"] == 1 and verdict["p_value"] == 0.5
    job = client.get(f"/v1/tuning/jobs/{job_id}").json()
    assert job["metrics"]["zero_shot_test"] == verdict and job["result"] == {"task": "held", "version": 1}


def test_a_job_reports_the_bare_templates_hold_out_scores_and_the_verdict(client, settings, tiny_backbone):
    job_id = _job_on_200_reviews(client)
    outcome = run_job(db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone)
    metrics = client.get(f"/v1/tuning/jobs/{job_id}").json()["metrics"]
    verdict = metrics["zero_shot_test"]
    # Whichever way it went, the verdict decided it, and it counted the hold-out's rows.
    assert verdict["rows"] == 20 and verdict["metric"] == "accuracy"
    assert verdict["prompt_better"] + verdict["bare_better"] <= 20
    assert outcome == ("failed" if verdict["worse"] else "succeeded")
    if outcome == "succeeded":
        assert client.get("/v1/prompts/held/versions/1").json()["metrics"]["zero_shot_val_loss"] > 0
    assert metrics["zero_shot_val_loss"] > 0 and metrics["best_step"] in (0, 2)
    assert "val_rows" not in metrics


def test_a_job_whose_prompt_is_unsafe_to_serve_publishes_nothing(
    client, settings, tiny_backbone, monkeypatch
):
    real = training.train_prompt

    def exploded(*args, **kwargs):
        result = real(*args, **kwargs)
        result.prompt = torch.full_like(result.prompt, 3e38)  # finite, and overflows the backbone
        return result

    monkeypatch.setattr(training, "train_prompt", exploded)
    job_id = _job_on_200_reviews(client)
    assert run_job(db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone) == "failed"
    job = client.get(f"/v1/tuning/jobs/{job_id}").json()
    assert job["error"]["code"] == "unusable_prompt" and "reaches 3e+38" in job["error"]["message"]
    assert client.get("/v1/prompts/held").status_code == 404
