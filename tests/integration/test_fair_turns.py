"""Fair turns through real processes: one worker, one tenant's long jobs queued and running, and another
tenant's small job, on the embedded stack and on PostgreSQL + Redis."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import pytest

from tests.helpers import bearer, sentiment_file
from tests.integration.processes import (
    free_port,
    migrated_api,
    running,
    service_env,
    wait_for_job,
    wait_until,
)
from tests.paths import REPO
from tests.stacks import STACK_PARAMS, stack_of

pytestmark = pytest.mark.worker

TIME_SLICE_S = 3
FINISHED = ("succeeded", "failed", "cancelled")


def _tenant(env: dict[str, str], base_url: str, name: str) -> httpx.Client:
    made = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", name],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return httpx.Client(base_url=base_url, headers=bearer(made.stdout.split()[-1]), timeout=60)


def _job(client: httpx.Client, steps: int) -> int:
    dataset = client.post("/v1/datasets", files={"file": ("train.jsonl", sentiment_file())}).json()
    body = {"task": "sst2", "training_dataset": dataset["id"], "template": "Review: {input}\nSentiment:"}
    response = client.post(
        "/v1/tuning/jobs", json={**body, "hyperparameters": {"steps": steps, "batch_size": 2}}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


# One worker is the embedded deployment (`softprompt up`); the rules that pick the next run are tested on
# both databases in tests/api/test_fair_turns.py.
@pytest.mark.parametrize("stack_kind", STACK_PARAMS[:1])
def test_with_one_worker_another_tenants_small_job_starts_within_the_time_slice(
    stack_kind, tmp_path, tiny_backbone_dir
):
    port = free_port()
    with ExitStack() as stack:
        servers = stack.enter_context(stack_of(stack_kind))
        env = service_env(
            tmp_path / "data",
            tiny_backbone_dir,
            servers,
            SOFTPROMPT_RUN_TIME_SLICE_S=str(TIME_SLICE_S),
            SOFTPROMPT_REAPER_INTERVAL_S="1",
        )
        migrated_api(stack, env, port, tmp_path)
        base_url = f"http://127.0.0.1:{port}"
        heavy, light = _tenant(env, base_url, "heavy"), _tenant(env, base_url, "light")
        stack.callback(heavy.close)
        stack.callback(light.close)
        stack.enter_context(running(["worker"], env, tmp_path / "worker.log"))

        long_jobs = [_job(heavy, steps=100_000) for _ in range(2)]
        wait_until(heavy, f"/v1/tuning/jobs/{long_jobs[0]}", lambda job: job["progress"]["step"] >= 1)
        submitted = time.monotonic()
        small = _job(light, steps=2)
        started = wait_until(light, f"/v1/tuning/jobs/{small}", lambda job: job["status"] != "queued")
        waited = time.monotonic() - submitted
        print(f"the other tenant's job started {waited:.1f} s after it was submitted")
        assert waited < TIME_SLICE_S + 60
        assert wait_for_job(light, small, FINISHED, timeout=60)["status"] == "succeeded", started

        events = heavy.get(f"/v1/tuning/jobs/{long_jobs[0]}/events").json()
        assert any(event["data"].get("yielded") for event in events)
        for job_id in long_jobs:
            heavy.post(f"/v1/tuning/jobs/{job_id}/cancel")
        for job_id in long_jobs:
            assert wait_for_job(heavy, job_id, FINISHED, timeout=60)["status"] == "cancelled"
