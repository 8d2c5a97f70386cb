"""What many tests share: the standard small dataset and template, uploads, keys, the API served over real
HTTP in this process, the `softprompt` command, and reading back a stored prompt."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import uvicorn
from fastapi.testclient import TestClient

from app.config import Settings
from app.contract.kinds import Method
from app.db.models import PromptVersion
from app.db.session import session_scope
from app.main import create_app
from app.ml.soft_prompt import loose_shape, prompt_from_bytes, prompt_to_bytes
from app.services.tenancy.api_keys import create_key
from app.services.tuning.training import run_job
from tests.paths import REPO
from tests.stacks import Stack

TEMPLATE = "Review: {input}\nSentiment:"
SENTIMENT = [("a wonderful, moving film", "positive"), ("dull and far too long", "negative")] * 10


def jsonl(records) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def sentiment_file() -> bytes:
    """20 labelled reviews, two classes, as a JSONL upload."""
    return jsonl({"text": t, "label": label} for t, label in SENTIMENT)


def upload(client, content: bytes, filename: str = "train.jsonl", headers: dict | None = None, **form):
    return client.post("/v1/datasets", files={"file": (filename, content)}, data=form, headers=headers)


def predictions(client, evaluation_id: int) -> list[dict]:
    """A succeeded evaluation's predictions file, one dict per line."""
    response = client.get(f"/v1/evaluations/{evaluation_id}/predictions")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


def new_key(stack: Stack, tenant: str) -> str:
    with session_scope(stack.database_url) as session:
        return create_key(session, tenant=tenant).key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def quota_client(settings: Settings, key: str, **quotas) -> TestClient:
    """The API for ``key`` with these quota settings, the key's tenant read afresh on every request."""
    return TestClient(
        create_app(settings.model_copy(update={"auth_cache_ttl_s": 0.0, **quotas})), headers=bearer(key)
    )


@contextmanager
def running(app) -> Iterator[str]:
    """``app`` served over real HTTP on a free loopback port, in this process; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def softprompt(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    """The `softprompt` command on ``stack``, with no other SOFTPROMPT_ setting from this environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTPROMPT_")} | stack.env()
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=env, cwd=REPO, capture_output=True, text=True
    )


def adapter_zip(virtual_tokens: int = 3, width: int = 64) -> bytes:
    """A PEFT prompt-tuning adapter, zipped as POST /v1/prompts/{task}/versions takes it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter_config.json", json.dumps({"peft_type": "PROMPT_TUNING"}))
        archive.writestr("adapter_model.safetensors", prompt_to_bytes(torch.zeros(virtual_tokens, width)))
    return buffer.getvalue()


def stored_prompt(settings: Settings) -> torch.Tensor:
    """The one version in the registry, its soft prompt decoded (a prefix: [2, L, H_kv, k, Dh])."""
    with session_scope(settings.registry_url) as session:
        row = session.query(PromptVersion).one()
        return prompt_from_bytes(row.vectors, shape=loose_shape(Method(row.method), row.embedding_dim))


def tune_here(client, settings: Settings, backbone, **job) -> dict:
    """A job on the 20 reviews, 3 steps of 4 with 4 virtual tokens unless ``job`` says otherwise, trained
    in this process as a worker would; its body as created."""
    dataset_id = upload(client, sentiment_file()).json()["id"]
    body = {
        "training_dataset": dataset_id,
        "template": TEMPLATE,
        "num_virtual_tokens": 4,
        "hyperparameters": {"steps": 3, "batch_size": 4},
        **job,
    }
    created = client.post("/v1/tuning/jobs", json=body)
    assert created.status_code == 201, created.text
    outcome = run_job(db_url=settings.registry_url, job_id=created.json()["id"], backbone=backbone)
    assert outcome == "succeeded"
    return created.json()
