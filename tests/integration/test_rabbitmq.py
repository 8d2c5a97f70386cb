"""RabbitMQ as the broker, where it differs from Redis: the broker restarted under a running job, and a job
longer than RabbitMQ's consumer timeout (an unacknowledged delivery past it closes the worker's channel and
is delivered again). Either way the registry's lease, not the broker, decides who runs a job: it finishes
once, never twice, and is never lost. (A worker killed mid-job, and the soak, run on RabbitMQ too:
test_worker_faults.py, test_soak.py.)"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from tests.helpers import sentiment_file
from tests.integration.processes import free_port, running, service_env, wait_for_job
from tests.integration.test_worker_faults import FAST_RECOVERY, migrated_api
from tests.stacks import server_stack

pytestmark = [
    pytest.mark.worker,
    pytest.mark.postgres,
    pytest.mark.rabbitmq,
    pytest.mark.xdist_group("rabbitmq"),
]
FINISHED = ("succeeded", "failed", "cancelled")


def rabbitmqctl(*args: str) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is needed to restart or reconfigure the RabbitMQ server")
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def consumer_timeout(ms: int) -> Iterator[None]:
    """The server's consumer timeout set to ``ms`` for channels opened meanwhile, checked every second
    (RabbitMQ's defaults: 30 minutes, checked every minute); the defaults again afterwards."""
    rabbitmqctl(
        "eval",
        f"application:set_env(rabbit, consumer_timeout, {ms}), "
        "application:set_env(rabbit, channel_tick_interval, 1000).",
    )
    try:
        yield
    finally:
        rabbitmqctl(
            "eval",
            "application:set_env(rabbit, consumer_timeout, 1800000), "
            "application:set_env(rabbit, channel_tick_interval, 60000).",
        )


def worker_logs(tmp_path) -> str:
    return "".join(log.read_text() for log in sorted(tmp_path.glob("worker-*.log")))


def submit(client, steps: int) -> dict:
    """A job, sent again with its Idempotency-Key while the API answers 503 (the broker unreachable), as a
    client is told to."""
    dataset = client.post("/v1/datasets", files={"file": ("reviews.jsonl", sentiment_file())}).json()
    body = {"task": "reviews", "training_dataset": dataset["id"], "hyperparameters": {"steps": steps}}
    headers = {"Idempotency-Key": f"job-{dataset['id']}"}
    deadline = time.monotonic() + 60
    while (answer := client.post("/v1/tuning/jobs", json=body, headers=headers)).status_code == 503:
        assert time.monotonic() < deadline, answer.text
        time.sleep(1)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


def test_a_job_finishes_once_when_rabbitmq_restarts_under_it(tmp_path, tiny_backbone_dir):
    port = free_port()
    with ExitStack() as stack:
        servers = stack.enter_context(server_stack(broker="rabbitmq"))
        env = service_env(tmp_path / "data", tiny_backbone_dir, servers, **FAST_RECOVERY)
        env["SOFTPROMPT_JOB_LEASE_S"] = "60"  # longer than the restart: the worker keeps its job
        client = migrated_api(stack, env, port, tmp_path)
        stack.enter_context(running(["worker"], env, tmp_path / "worker.log"))
        job = submit(client, steps=1500)
        wait_for_job(client, job["id"], ("running",), timeout=120)

        rabbitmqctl("stop_app")
        rabbitmqctl("start_app")
        later = submit(client, steps=20)  # the API reaches the broker again

        done = wait_for_job(client, job["id"], FINISHED, timeout=180)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert wait_for_job(client, later["id"], FINISHED, timeout=120)["status"] == "succeeded"
        versions = client.get("/v1/prompts/reviews").json()["versions"]
        assert sorted(v["source_job"] for v in versions) == [job["id"], later["id"]]  # one version each


def test_a_job_longer_than_rabbitmqs_consumer_timeout_succeeds_once(tmp_path, tiny_backbone_dir):
    port = free_port()
    with ExitStack() as stack:
        servers = stack.enter_context(server_stack(broker="rabbitmq"))
        env = service_env(tmp_path / "data", tiny_backbone_dir, servers, **FAST_RECOVERY)
        client = migrated_api(stack, env, port, tmp_path)
        stack.enter_context(consumer_timeout(2000))
        stack.enter_context(running(["worker"], env, tmp_path / "worker-1.log"))
        # A second worker, idle: the delivery the broker takes back from the first is offered to it.
        stack.enter_context(running(["worker"], env, tmp_path / "worker-2.log"))
        job = submit(client, steps=3000)  # several seconds, past the 2 s timeout

        done = wait_for_job(client, job["id"], FINISHED, timeout=180)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        # The broker took the delivery back and sent it again; the registry's lease refused it.
        deadline = time.monotonic() + 30
        while "job 1 not claimed" not in (logs := worker_logs(tmp_path)):
            assert time.monotonic() < deadline, (
                "the job was not delivered again: it never crossed the timeout"
            )
            time.sleep(0.2)
        assert logs.count("job 1 claimed by") == 1
        versions = client.get("/v1/prompts/reviews").json()["versions"]
        assert [v["source_job"] for v in versions] == [job["id"]]
