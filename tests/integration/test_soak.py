"""Twenty short jobs, two workers side by side, and workers killed at random while they run: every job
succeeds, the task gets exactly twenty versions, and no job is ever trained by two workers at once."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers import sentiment_file
from tests.integration.processes import free_port, job_holder, migrated_api, running, service_env, stop
from tests.stacks import RABBITMQ_PARAM, STACK_PARAMS, stack_of

pytestmark = pytest.mark.worker

JOBS = 12
STEPS = 600  # a few seconds a job: its progress (written once a second) shows it running, to be killed
KILLS = 4
SOAK_ENV = {
    "SOFTPROMPT_JOB_LEASE_S": "3",
    "SOFTPROMPT_REAPER_INTERVAL_S": "1",
    "SOFTPROMPT_JOB_RESEND_AFTER_S": "5",
    "SOFTPROMPT_CHECKPOINT_EVERY_STEPS": "20",
    # Kills are random, so one job may be hit several times; the attempt cap has its own test.
    "SOFTPROMPT_JOB_MAX_ATTEMPTS": str(KILLS + 1),
    # All are queued at once by one tenant, past the default quota of 4.
    "SOFTPROMPT_TENANT_MAX_ACTIVE_JOBS": str(JOBS),
}
# The worker's own log lines (JSON), "job N claimed by host:pid:thread" and "job N released by ...".
_RUN_MESSAGE = re.compile(r"job (\d+) (claimed|released) by [^:]+:(\d+):")


# On the production shape only: two workers racing for leases is what PostgreSQL's row locks and Redis's
# redelivery are for. The embedded stack's recovery from killed workers is tested in test_worker_faults.py.
@pytest.mark.parametrize("stack_kind", [STACK_PARAMS[1], RABBITMQ_PARAM])
def test_a_dozen_jobs_survive_random_worker_kills_with_two_workers(stack_kind, tmp_path, tiny_backbone_dir):
    rng = random.Random(20)
    port = free_port()
    with ExitStack() as stack:
        servers = stack.enter_context(stack_of(stack_kind))
        env = service_env(tmp_path / "data", tiny_backbone_dir, servers, **SOAK_ENV)
        client = migrated_api(stack, env, port, tmp_path)
        workers: list[subprocess.Popen] = []
        logs: list[Path] = []
        killed_at: dict[int, float] = {}  # pid -> when it was killed

        def start_worker() -> subprocess.Popen:
            logs.append(tmp_path / f"worker-{len(logs)}.log")
            worker = stack.enter_context(running(["worker"], env, logs[-1]))
            workers.append(worker)
            return worker

        slots = [start_worker(), start_worker()]
        dataset = client.post("/v1/datasets", files={"file": ("reviews.jsonl", sentiment_file())}).json()
        body = {"task": "soak", "training_dataset": dataset["id"], "hyperparameters": {"steps": STEPS}}
        jobs = [client.post("/v1/tuning/jobs", json=body).json()["id"] for _ in range(JOBS)]

        def unfinished() -> list[dict]:
            listed = [client.get(f"/v1/tuning/jobs/{job_id}").json() for job_id in jobs]
            return [job for job in listed if job["status"] not in ("succeeded", "failed", "cancelled")]

        kills = 0
        deadline = time.monotonic() + 300
        while pending := unfinished():
            assert time.monotonic() < deadline, f"unfinished after 300 s: {pending}"
            training = [job for job in pending if job["status"] == "running" and job["progress"]["step"] > 0]
            if kills < KILLS and training:
                time.sleep(rng.uniform(0.2, 1.0))
                holder = job_holder(client, rng.choice(training)["id"])
                slot = next((i for i, worker in enumerate(slots) if worker.pid == holder), None)
                if slot is None:
                    continue  # the job moved on meanwhile
                os.killpg(slots[slot].pid, signal.SIGKILL)
                slots[slot].wait()
                killed_at[slots[slot].pid] = time.time()
                kills += 1
                slots[slot] = start_worker()
            else:
                time.sleep(0.5)
        for worker in slots:
            stop(worker)  # so their logs are complete

        finished = [client.get(f"/v1/tuning/jobs/{job_id}").json() for job_id in jobs]
        failed = [job for job in finished if job["status"] != "succeeded"]
        assert not failed, failed
        versions = client.get("/v1/prompts/soak").json()["versions"]
        assert sorted(v["version"] for v in versions) == list(range(1, JOBS + 1))
        assert sorted(v["source_job"] for v in versions) == sorted(jobs)
        runs = _runs(logs, killed_at)
        assert len({job for job, *_ in runs}) == JOBS, runs  # the log lines were read: every job's runs
        _assert_never_two_at_once(runs)
        retried = sum(job["attempts"] - 1 for job in finished)
        print(f"{kills} kills, {retried} jobs' attempts redone, {len(runs)} runs, {len(versions)} versions")
        # Each kill aimed at a job mid-run, which then ran once more; one may miss if its job ended in the
        # instant between looking up its worker and the kill.
        assert kills == KILLS and retried >= KILLS - 1


def _runs(logs: list[Path], killed_at: dict[int, float]) -> list[tuple[int, int, float, float]]:
    """(job, pid, start, end) of every run the workers logged; a killed worker's run ends at its kill."""
    runs, open_runs = [], {}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("logger") == "app.services.runs.lifecycle" and (
                match := _RUN_MESSAGE.match(record["message"])
            ):
                job, what, pid = match.groups()
                assert record["job_id"] == int(job)  # the line carries the job it is about
                at = datetime.strptime(record["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if what == "claimed":
                    open_runs[int(job), int(pid)] = at
                else:
                    runs.append((int(job), int(pid), open_runs.pop((int(job), int(pid))), at))
    for (job, pid), start in open_runs.items():
        assert pid in killed_at, f"job {job}'s run on worker {pid} never ended and the worker was not killed"
        runs.append((job, pid, start, killed_at[pid]))
    return runs


def _assert_never_two_at_once(runs: list[tuple[int, int, float, float]]) -> None:
    by_job: dict[int, list[tuple[float, float, int]]] = {}
    for job, pid, start, end in runs:
        by_job.setdefault(job, []).append((start, end, pid))
    for job, spans in by_job.items():
        spans.sort()
        for (_, end, pid), (start, _, next_pid) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"job {job}: worker {next_pid} started it before worker {pid} stopped"
