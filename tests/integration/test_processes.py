"""The whole path through real processes: upload -> Celery worker -> registry -> inference.

Embedded default: `softprompt up` alone (SQLite registry, Celery over SQLite). Production shape:
`softprompt db upgrade`, then `softprompt api` and `softprompt worker` as separate processes on the
PostgreSQL and Redis servers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import sentiment_file
from tests.integration.processes import free_port, running, service_env, wait_for_job, wait_ready
from tests.paths import REPO
from tests.stacks import STACK_PARAMS, server_stack

pytestmark = pytest.mark.worker


@dataclass
class Service:
    api: httpx.Client
    worker_log: Path
    api_log: Path
    env: dict[str, str]
    worker_metrics: str  # the worker's Prometheus endpoint


@pytest.fixture(params=STACK_PARAMS)
def service(request, tmp_path, tiny_backbone_dir, unsupported_backbone_dir):
    port, metrics_port = free_port(), free_port()
    metrics = {
        "SOFTPROMPT_WORKER_METRICS_PORT": str(metrics_port),
        "SOFTPROMPT_BACKBONES": json.dumps(
            {"tiny": str(tiny_backbone_dir), "bert": str(unsupported_backbone_dir)}
        ),
    }
    with ExitStack() as stack:
        if request.param == "embedded":
            env = service_env(tmp_path / "data", tiny_backbone_dir, None, **metrics)
            log = worker_log = tmp_path / "up.log"  # `up` runs its worker as a child with the same output
            process = stack.enter_context(running(["up", "--port", str(port)], env, log))
        else:
            servers = stack.enter_context(server_stack())
            env = service_env(tmp_path / "data", tiny_backbone_dir, servers, **metrics)
            subprocess.run([sys.executable, "-m", "app.cli", "db", "upgrade"], env=env, cwd=REPO, check=True)
            log = tmp_path / "api.log"
            process = stack.enter_context(running(["api", "--port", str(port)], env, log))
            worker_log = tmp_path / "worker.log"
            stack.enter_context(running(["worker"], env, worker_log))
        client = wait_ready(f"http://127.0.0.1:{port}", process, log)
        stack.callback(client.close)
        yield Service(client, worker_log, log, env, f"http://127.0.0.1:{metrics_port}/metrics")


def create_key(service: Service, tenant: str) -> str:
    """`softprompt keys create`, as an operator runs it; the key is its last line."""
    made = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", tenant],
        env=service.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return made.stdout.splitlines()[-1]


def test_upload_tune_and_serve(service):
    dataset = service.api.post("/v1/datasets", files={"file": ("reviews.jsonl", sentiment_file())}).json()
    job = service.api.post(
        "/v1/tuning/jobs",
        json={
            "task": "reviews",
            "training_dataset": dataset["id"],
            "template": "Review: {input}\nSentiment:",
            "num_virtual_tokens": 4,
            "hyperparameters": {"steps": 20, "batch_size": 4},
        },
    ).json()
    done = wait_for_job(service.api, job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done
    assert done["result"] == {"task": "reviews", "version": 1} and done["attempts"] == 1
    assert done["progress"]["step"] == 20
    assert 0 <= done["metrics"]["val_accuracy"] <= 1  # on the 2 held-out examples
    events = service.api.get(f"/v1/tuning/jobs/{job['id']}/events").json()
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert any(e["type"] == "progress" and e["data"]["total_steps"] == 20 for e in events)

    result = service.api.post("/v1/classify", json={"task": "reviews", "input": ["a wonderful, moving film"]})
    assert result.status_code == 200 and result.json()["version"] == 1
    assert set(result.json()["results"][0]["scores"]) == {"negative", "positive"}

    second = service.api.post(
        "/v1/tuning/jobs",
        json={"task": "reviews", "training_dataset": dataset["id"], "hyperparameters": {"steps": 2}},
    ).json()
    assert wait_for_job(service.api, second["id"], ("succeeded", "failed"))["result"]["version"] == 2
    # One JSON line per event in both processes, carrying the request's or the job's ids.
    api_lines = [
        json.loads(line) for line in service.api_log.read_text().splitlines() if line.startswith("{")
    ]
    access = [
        r for r in api_lines if r["logger"] == "softprompt.access" and "/v1/tuning/jobs" in r["message"]
    ]
    assert access and all(len(r["request_id"]) == 32 for r in access)
    worker_lines = [
        json.loads(line) for line in service.worker_log.read_text().splitlines() if line.startswith("{")
    ]
    claimed = [r for r in worker_lines if r["message"].startswith(f"job {job['id']} claimed")]
    assert claimed and claimed[0]["job_id"] == job["id"] and claimed[0]["task"] == "reviews"
    assert {"time", "level", "logger", "message"} <= set(claimed[0])
    # The worker loaded its backbone once, not once per job.
    assert service.worker_log.read_text().count("loaded backbone tiny") == 1
    # Its metrics count both jobs and their 22 steps (a step's time is known from the second on).
    scraped = httpx.get(service.worker_metrics).text
    assert 'softprompt_worker_jobs_total{outcome="succeeded"} 2.0' in scraped
    steps = next(
        line for line in scraped.splitlines() if line.startswith("softprompt_worker_step_seconds_count")
    )
    assert float(steps.split()[-1]) >= 19

    # A configured backbone whose architecture cannot work: its job fails saying why, and nothing waits.
    refused = service.api.post(
        "/v1/tuning/jobs",
        json={"task": "other", "training_dataset": dataset["id"], "base_model": "bert"},
    ).json()
    failed = wait_for_job(service.api, refused["id"], ("succeeded", "failed"))
    assert failed["status"] == "failed" and failed["error"]["code"] == "unsupported_backbone"
    assert "backbone 'bert'" in failed["error"]["message"]
    assert service.api.get("/v1/prompts/other").status_code == 404


@pytest.mark.parametrize("service", ["embedded"], indirect=True)  # a service rule: one stack
def test_cancel_a_running_job(service):
    dataset = service.api.post("/v1/datasets", files={"file": ("reviews.jsonl", sentiment_file())}).json()
    job = service.api.post(
        "/v1/tuning/jobs",
        json={
            "task": "long",
            "training_dataset": dataset["id"],
            "hyperparameters": {"steps": 100000, "batch_size": 2},
        },
    ).json()
    wait_for_job(service.api, job["id"], ("running",))
    asked = time.monotonic()
    assert service.api.post(f"/v1/tuning/jobs/{job['id']}/cancel").status_code == 200
    done = wait_for_job(service.api, job["id"], ("cancelled", "succeeded", "failed"), timeout=30)
    assert done["status"] == "cancelled" and done["result"] is None
    assert time.monotonic() - asked < 10
    assert service.api.get("/v1/prompts/long").status_code == 404


@pytest.mark.parametrize("service", ["embedded"], indirect=True)  # a service rule: one stack
def test_the_first_key_ends_the_open_mode_and_no_key_reaches_the_logs(service):
    assert service.api.get("/v1/datasets").status_code == 200  # no key yet: loopback is served
    key = create_key(service, "default")
    deadline = time.monotonic() + 10  # the API remembers "no keys" for 2 s
    while (answer := service.api.get("/v1/datasets")).status_code != 401:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert service.api.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    wrong = key[:-2] + "xy"
    assert service.api.get("/v1/datasets", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    logs = service.api_log.read_text() + service.worker_log.read_text()
    assert "GET /v1/datasets 401" in logs  # the access log is there, and it holds no key
    assert key not in logs and wrong not in logs and key[3:20] not in logs


def test_the_openai_sdk_end_to_end(service):
    """What a product backend on the OpenAI SDK does, against the real processes and a real worker."""
    sdk = openai.OpenAI(base_url=f"{service.api.base_url}/v1", api_key=create_key(service, "product"))
    uploaded = sdk.files.create(file=("reviews.jsonl", sentiment_file()), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="reviews",
        hyperparameters={"batch_size": 4, "n_epochs": 2},
        extra_body={"method": {"type": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 4}}},
    )
    deadline = time.monotonic() + 180
    while (job := sdk.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job.status == "succeeded" and job.fine_tuned_model == "ft:tiny:reviews:1", job

    completion = sdk.completions.create(
        model=job.fine_tuned_model, prompt="a wonderful, moving film", max_tokens=4, temperature=0
    )
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens >= 1
    stream = sdk.chat.completions.create(
        model="reviews",
        messages=[{"role": "user", "content": "a wonderful, moving film"}],
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == completion.choices[0].text  # one template, one engine, greedy: the same text
