"""Prefix tuning through the API: a job with `"method": "prefix"` publishes a prefix version that the same
routes serve, exactly as the backbone with the prefix as its past keys and values."""

from __future__ import annotations

from app.ml import inference
from app.ml.layout import context_ids
from tests.helpers import TEMPLATE, sentiment_file, stored_prompt, tune_here, upload


def _prefix_job(client, settings, tiny_backbone, **body) -> dict:
    job = tune_here(client, settings, tiny_backbone, task="deep", method="prefix", **body)
    assert job["method"] == "prefix"
    return job


def test_a_prefix_job_publishes_a_prefix_version_that_is_served_exactly(client, settings, tiny_backbone):
    _prefix_job(client, settings, tiny_backbone)
    version = client.get("/v1/prompts/deep/versions/1").json()
    assert version["method"] == "prefix" and version["num_virtual_tokens"] == 4
    prefix = stored_prompt(settings)
    assert prefix.ndim == 5 and prefix.shape[3] == 4
    text = "a wonderful, moving film"
    served = client.post("/v1/generate", json={"task": "deep", "input": text, "max_new_tokens": 6}).json()
    rendered = TEMPLATE.replace("{input}", text)
    expected = inference.generate_reference(tiny_backbone, prompt=prefix, text=rendered, max_new_tokens=6)
    assert served["outputs"][0]["tokens"] == len(expected)
    assert served["usage"]["prompt_tokens"] == len(context_ids(tiny_backbone, rendered))
    assert served["outputs"][0]["text"] == tiny_backbone.tokenizer.decode(expected)
    scores = client.post("/v1/classify", json={"task": "deep", "input": [text, "dull"]}).json()["results"]
    expected_scores = inference.classify(
        tiny_backbone,
        prompts=[prefix] * 2,
        texts=[rendered, TEMPLATE.replace("{input}", "dull")],
        labels=["negative", "positive"],
    )
    for got, want in zip(scores, expected_scores, strict=True):
        assert set(got["scores"]) == set(want)
        assert all(abs(got["scores"][label] - p) < 1e-5 for label, p in want.items())


def test_a_prefix_may_start_at_zero_and_a_prompt_may_not(client, settings, tiny_backbone):
    _prefix_job(client, settings, tiny_backbone, init={"strategy": "zero"})
    dataset_id = upload(client, sentiment_file()).json()["id"]
    refused = client.post(
        "/v1/tuning/jobs",
        json={
            "task": "flat",
            "training_dataset": dataset_id,
            "method": "prompt",
            "init": {"strategy": "zero"},
        },
    )
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "init.strategy"
