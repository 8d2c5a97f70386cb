"""A worker killed mid-job or mid-evaluation, through real processes: `softprompt api` and `softprompt worker`
on the embedded stack (SQLite registry, Celery over SQLite) and on PostgreSQL + Redis. Short leases and a
fast reaper keep the test quick; the mechanism is the one production runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import redis

from app.db.models import JobCheckpoint
from app.db.session import session_scope
from tests.helpers import jsonl, predictions, sentiment_file
from tests.integration.processes import (
    free_port,
    job_holder,
    migrated_api,
    running,
    service_env,
    wait_for_evaluation,
    wait_for_job,
    wait_until,
)
from tests.stacks import RABBITMQ_PARAM, STACK_PARAMS, Stack, postgres_database, redis_namespace, stack_of

pytestmark = pytest.mark.worker

CHECKPOINT_EVERY = 10
FAST_RECOVERY = {
    "SOFTPROMPT_JOB_LEASE_S": "3",
    "SOFTPROMPT_REAPER_INTERVAL_S": "1",
    "SOFTPROMPT_CHECKPOINT_EVERY_STEPS": str(CHECKPOINT_EVERY),
}


# SIGTERM is how `softprompt up` (the embedded stack) stops its worker; SIGKILL is what a production worker
# meets when its machine goes (the soak test kills many more on PostgreSQL + Redis).
@pytest.mark.parametrize(
    ("stack_kind", "ending"),
    [
        pytest.param("embedded", "SIGTERM", id="embedded-SIGTERM"),
        pytest.param(
            *STACK_PARAMS[1].values, "SIGKILL", marks=STACK_PARAMS[1].marks, id="postgres+redis-SIGKILL"
        ),
        pytest.param(
            *RABBITMQ_PARAM.values, "SIGKILL", marks=RABBITMQ_PARAM.marks, id="postgres+rabbitmq-SIGKILL"
        ),
    ],
)
def test_a_job_whose_worker_ends_mid_run_is_finished_by_another_from_its_checkpoint(
    stack_kind, ending, tmp_path, tiny_backbone_dir
):
    """SIGKILL: the lease lapses and the reaper queues the job again, a second attempt. SIGTERM: the worker
    saves its state and hands the job back at once, which is not counted as an attempt."""
    port = free_port()
    with ExitStack() as stack:
        servers = stack.enter_context(stack_of(stack_kind))
        env = service_env(tmp_path / "data", tiny_backbone_dir, servers, **FAST_RECOVERY)
        client = migrated_api(stack, env, port, tmp_path)
        # Each worker as if on a machine of its own: a data directory of its own, sharing only the registry
        # and the broker. The second one must find the first one's checkpoint there.
        first_env, second_env = (on_its_own_machine(env, tmp_path / name) for name in ("host-1", "host-2"))
        first = stack.enter_context(running(["worker"], first_env, tmp_path / "worker-1.log"))

        dataset = client.post("/v1/datasets", files={"file": ("reviews.jsonl", sentiment_file())}).json()
        steps = 250
        job = client.post(
            "/v1/tuning/jobs",
            json={"task": "reviews", "training_dataset": dataset["id"], "hyperparameters": {"steps": steps}},
        ).json()
        # Ended at its first checkpoint, read from the registry: the job's progress shows once a second,
        # and the tiny backbone has run all 250 steps in a second on an idle machine.
        deadline = time.monotonic() + 120
        while not (step := _checkpointed_step(first_env["SOFTPROMPT_DATABASE_URL"], job["id"])):
            assert time.monotonic() < deadline, "the first worker never got going"
            time.sleep(0.02)
        os.killpg(first.pid, getattr(signal, ending))
        first.wait(timeout=30)
        killed_at = time.monotonic()
        stack.enter_context(running(["worker"], second_env, tmp_path / "worker-2.log"))

        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
        recovered_in = time.monotonic() - killed_at
        assert done["status"] == "succeeded", done
        assert done["attempts"] == (2 if ending == "SIGKILL" else 1)
        assert done["progress"]["step"] == steps
        versions = client.get("/v1/prompts/reviews").json()["versions"]
        assert [v["version"] for v in versions] == [1]
        events = client.get(f"/v1/tuning/jobs/{job['id']}/events").json()
        resumed = [e["data"]["resumed_from_step"] for e in events if "resumed_from_step" in e["data"]]
        assert len(resumed) == 1
        # The kill came once the checkpoint of `step` was written, and the run went on from the last
        # checkpoint before the kill (or, after SIGTERM, the state saved at the hand-back).
        assert step <= resumed[0] < steps
        if ending == "SIGTERM":  # the state saved at the hand-back, not an older checkpoint
            handed_back = [e["data"]["step"] for e in events if _is_hand_back(e)]
            assert resumed == handed_back
        print(f"{ending} after step {step}, resumed from {resumed[0]}, succeeded {recovered_in:.1f} s later")
        with session_scope(first_env["SOFTPROMPT_DATABASE_URL"]) as session:
            assert session.query(JobCheckpoint).count() == 0  # the finished job left no checkpoint behind


# 120 batches of 8 rows, 16 greedy tokens each: about two seconds of decoding on the tiny backbone on an idle
# machine. The worker is killed as soon as it has claimed the evaluation (its progress shows once a second).
EVALUATION_ROWS = 960
CANCELLED_ROWS = 8_000
EVALUATION_BATCH = {"SOFTPROMPT_EVALUATION_BATCH_ROWS": "8"}
FINISHED = ("succeeded", "failed", "cancelled")


# A worker's lease, its reaper and its hand-back are one lifecycle for jobs and evaluations
# (app/services/runs/lifecycle.py): the job tests above and below cover it on the embedded stack.
@pytest.mark.parametrize("stack_kind", STACK_PARAMS[1:])
def test_an_evaluation_whose_worker_is_killed_is_scored_again_from_the_first_row_and_counted_once(
    stack_kind, tmp_path, tiny_backbone_dir
):
    """SIGKILL mid-run: the lease lapses, the reaper queues the evaluation again and another worker scores
    it from the first row. Every row counts once, and the results are those of an uninterrupted run. A
    cancel while a worker scores stops it with no results."""
    port = free_port()
    with ExitStack() as stack:
        servers = stack.enter_context(stack_of(stack_kind))
        env = service_env(tmp_path / "data", tiny_backbone_dir, servers, **FAST_RECOVERY, **EVALUATION_BATCH)
        client = migrated_api(stack, env, port, tmp_path)
        first = stack.enter_context(running(["worker"], env, tmp_path / "worker-1.log"))

        counting = jsonl(
            {"input": f"count {i} after {i * 7 % 101}", "output": f"{i + 1}"} for i in range(EVALUATION_ROWS)
        )
        dataset = client.post("/v1/datasets", files={"file": ("counting.jsonl", counting)}).json()
        body = {"dataset": dataset["id"], "models": [None], "template": "Count: {input}\nNext:"}
        body["max_new_tokens"] = 16
        interrupted = client.post("/v1/evaluations", json=body).json()
        caught = _claimed(client, interrupted["id"])
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        killed_at = time.monotonic()
        stack.enter_context(running(["worker"], env, tmp_path / "worker-2.log"))

        done = wait_for_evaluation(client, interrupted["id"], FINISHED)
        recovered_in = time.monotonic() - killed_at
        print(f"killed after {caught['progress']['done']} rows, succeeded {recovered_in:.1f} s later")
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        assert done["progress"] == {"done": EVALUATION_ROWS, "total": EVALUATION_ROWS}
        rows = predictions(client, interrupted["id"])
        assert [row["row"] for row in rows] == list(range(1, EVALUATION_ROWS + 1))
        assert all(len(row["predictions"]) == 1 for row in rows)

        # The same evaluation again (a new one: no Idempotency-Key), run by one worker from start to end.
        again = client.post("/v1/evaluations", json=body).json()
        assert again["id"] != interrupted["id"]
        uninterrupted = wait_for_evaluation(client, again["id"], FINISHED)
        assert uninterrupted["status"] == "succeeded" and uninterrupted["attempts"] == 1, uninterrupted
        assert done["results"][0]["metrics"] is not None
        assert done["results"] == uninterrupted["results"]
        assert predictions(client, again["id"]) == rows

        # A cancel is seen within a second or so; an evaluation eight times as long cannot end first on any
        # machine, and stops early whatever its size.
        many = jsonl({"input": f"count {i}", "output": f"{i + 1}"} for i in range(CANCELLED_ROWS))
        longer = client.post("/v1/datasets", files={"file": ("many.jsonl", many)}).json()
        cancelled = client.post("/v1/evaluations", json={**body, "dataset": longer["id"]}).json()
        _scoring(client, cancelled["id"])
        assert client.post(f"/v1/evaluations/{cancelled['id']}/cancel").json()["status"] == "running"
        ended = wait_for_evaluation(client, cancelled["id"], FINISHED, timeout=60)
        assert ended["status"] == "cancelled" and ended["attempts"] == 1, ended
        assert ended["results"] == [{"model": None, "metrics": None}]
        assert ended["progress"]["done"] < CANCELLED_ROWS  # it stopped early, not at the end
        assert client.get(f"/v1/evaluations/{cancelled['id']}/predictions").status_code == 409


def _claimed(client, evaluation_id: int) -> dict:
    """Waits until a worker has claimed the evaluation and checks it is still at it."""
    deadline = time.monotonic() + 120
    while (evaluation := client.get(f"/v1/evaluations/{evaluation_id}").json())["status"] == "queued":
        assert time.monotonic() < deadline, "no worker claimed the evaluation"
        time.sleep(0.02)
    assert evaluation["status"] == "running", f"caught too late: {evaluation}"
    return evaluation


def _scoring(client, evaluation_id: int) -> dict:
    """Waits until a worker has scored some of the evaluation's rows and is still at it."""
    evaluation = wait_until(
        client,
        f"/v1/evaluations/{evaluation_id}",
        lambda e: e["status"] not in ("queued", "running") or e["progress"]["done"] > 0,
        timeout=120,
    )
    assert evaluation["status"] == "running", f"caught too late: {evaluation}"
    return evaluation


def on_its_own_machine(env: dict[str, str], data_dir: Path) -> dict[str, str]:
    """``env`` for a worker with a data directory of its own that shares only the registry database and
    the broker (named explicitly: on the embedded stack they are otherwise files in the data directory)."""
    shared = Path(env["SOFTPROMPT_DATA_DIR"])
    return {
        **env,
        "SOFTPROMPT_DATA_DIR": str(data_dir),
        "SOFTPROMPT_DATABASE_URL": env.get("SOFTPROMPT_DATABASE_URL")
        or f"sqlite:///{shared / 'softprompt.sqlite'}",
        "SOFTPROMPT_BROKER_URL": env.get("SOFTPROMPT_BROKER_URL")
        or f"sqla+sqlite:///{shared / 'broker.sqlite'}",
    }


def _checkpointed_step(database_url: str, job_id: int) -> int:
    """The step of the job's checkpoint in the registry; 0 before the first."""
    with session_scope(database_url) as session:
        checkpoint = session.get(JobCheckpoint, job_id)
        return checkpoint.step if checkpoint is not None else 0


def _is_hand_back(event: dict) -> bool:
    return event["type"] == "status" and event["data"].get("status") == "queued" and "step" in event["data"]


@contextmanager
def own_redis(port: int, log: Path) -> Iterator[subprocess.Popen]:
    """A Redis of this test's own that keeps nothing on disk: stopping it loses every message."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield process
    finally:
        process.kill()
        process.wait()


def test_every_accepted_job_finishes_after_redis_restarts_empty(tmp_path, tiny_backbone_dir):
    """One job running and two queued behind it when the broker dies and comes back with nothing in it:
    the running one finishes, and the reaper sends the lost messages of the queued ones again."""
    port, redis_port = free_port(), free_port()
    with ExitStack() as stack:
        database_url = stack.enter_context(postgres_database())
        broker = Stack("own-redis", database_url, f"redis://127.0.0.1:{redis_port}/0", "softprompt", "")
        env = service_env(
            tmp_path / "data", tiny_backbone_dir, broker, **FAST_RECOVERY, SOFTPROMPT_JOB_RESEND_AFTER_S="3"
        )
        redis_server = stack.enter_context(own_redis(redis_port, tmp_path / "redis.log"))
        client = migrated_api(stack, env, port, tmp_path)
        stack.enter_context(running(["worker"], env, tmp_path / "worker.log"))

        dataset = client.post("/v1/datasets", files={"file": ("reviews.jsonl", sentiment_file())}).json()
        bodies = [
            {"task": f"t{i}", "training_dataset": dataset["id"], "hyperparameters": {"steps": steps}}
            for i, steps in enumerate([300, 20, 20])
        ]
        jobs = [client.post("/v1/tuning/jobs", json=body).json() for body in bodies]
        wait_for_job(client, jobs[0]["id"], ("running",), timeout=120)
        redis_server.kill()
        redis_server.wait()
        stack.enter_context(own_redis(redis_port, tmp_path / "redis.log"))  # empty: the queue is gone

        for job in jobs:
            done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
            assert done["status"] == "succeeded", done
            assert done["result"]["version"] == 1


@contextmanager
def own_postgres(port: int) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A PostgreSQL server of this test's own (trust auth, user postgres): yields its data directory and a
    function that starts it again after stop_postgres. As root the server runs as the postgres user, as
    it must, in a directory of its own under the system's temporary directory (pytest's is root's only)."""
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if shutil.which("initdb") is None or (as_postgres and shutil.which("runuser") is None):
        pytest.skip("initdb (and, as root, runuser) is needed to run a PostgreSQL of the test's own")
    home = Path(tempfile.mkdtemp(prefix="softprompt-test-pg-"))
    data_dir = home / "data"
    try:
        if as_postgres:
            shutil.chown(home, "postgres")
        initdb = [*as_postgres, "initdb", "-D", str(data_dir), "-A", "trust", "-U", "postgres"]
        subprocess.run(initdb, check=True, capture_output=True)
        pg_ctl = [*as_postgres, "pg_ctl", "-D", str(data_dir), "-w"]
        options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1"

        def start() -> None:
            subprocess.run([*pg_ctl, "-o", options, "-l", str(home / "server.log"), "start"], check=True)

        start()
        try:
            yield data_dir, start
        finally:
            subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def stop_postgres(data_dir: Path) -> None:
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_postgres, "pg_ctl", "-D", str(data_dir), "-w", "-m", "immediate", "stop"], check=True)


def test_a_job_finishes_when_postgresql_comes_back_and_the_api_answers_503_meanwhile(
    tmp_path, tiny_backbone_dir
):
    port, pg_port = free_port(), free_port()
    with ExitStack() as stack:
        pg_dir, start_postgres = stack.enter_context(own_postgres(pg_port))
        broker_url, queue, prefix = stack.enter_context(redis_namespace())
        database_url = f"postgresql://postgres@127.0.0.1:{pg_port}/postgres"
        servers = Stack("own-postgres", database_url, broker_url, queue, prefix)
        env = service_env(tmp_path / "data", tiny_backbone_dir, servers, **FAST_RECOVERY)
        env["SOFTPROMPT_JOB_LEASE_S"] = "60"  # longer than the outage: the worker keeps its job
        client = migrated_api(stack, env, port, tmp_path)
        stack.enter_context(running(["worker"], env, tmp_path / "worker.log"))

        dataset = client.post("/v1/datasets", files={"file": ("reviews.jsonl", sentiment_file())}).json()
        body = {"task": "reviews", "training_dataset": dataset["id"], "hyperparameters": {"steps": 1500}}
        job = client.post("/v1/tuning/jobs", json=body).json()
        wait_for_job(client, job["id"], ("running",), timeout=120)

        stop_postgres(pg_dir)  # mid-run: 1,500 steps take the tiny backbone half a minute
        away = client.get(f"/v1/tuning/jobs/{job['id']}")
        assert away.status_code == 503 and away.json()["error"]["code"] == "database_unavailable"
        assert away.headers["Retry-After"]
        assert client.get("/readyz").status_code == 503
        # The worker trains on through the outage: back once it has failed to write its progress.
        deadline = time.monotonic() + 30
        while "unreachable" not in (tmp_path / "worker.log").read_text():
            assert time.monotonic() < deadline, "the worker never met the outage"
            time.sleep(0.2)
        start_postgres()
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the API did not become ready again"
            time.sleep(0.2)

        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1 and done["progress"]["step"] == 1500  # the same worker, no restart
        assert [v["version"] for v in client.get("/v1/prompts/reviews").json()["versions"]] == [1]


@pytest.mark.parametrize("stack_kind", STACK_PARAMS[:1])  # the soak kills workers on PostgreSQL + Redis
def test_a_job_that_kills_its_worker_every_attempt_fails_and_the_other_jobs_finish(
    stack_kind, tmp_path, tiny_backbone_dir
):
    """A poison job: each worker that picks it up dies (the test plays the kernel's OOM killer). After
    SOFTPROMPT_JOB_MAX_ATTEMPTS (3) attempts it fails with `worker_lost`; jobs behind it are not held up."""
    port = free_port()
    with ExitStack() as stack:
        servers = stack.enter_context(stack_of(stack_kind))
        env = service_env(tmp_path / "data", tiny_backbone_dir, servers, **FAST_RECOVERY)
        client = migrated_api(stack, env, port, tmp_path)
        workers = {}
        for i in range(2):
            worker = stack.enter_context(running(["worker"], env, tmp_path / f"worker-{i}.log"))
            workers[worker.pid] = worker

        dataset = client.post("/v1/datasets", files={"file": ("reviews.jsonl", sentiment_file())}).json()

        def submit(task: str, steps: int) -> int:
            hyperparameters = {"steps": steps, "batch_size": 2}  # the poison job within the work cap
            body = {"task": task, "training_dataset": dataset["id"], "hyperparameters": hyperparameters}
            return client.post("/v1/tuning/jobs", json=body).json()["id"]

        poison = submit("poison", 100_000)
        others = [submit(f"fine-{i}", 40) for i in range(3)]
        killed = set()
        deadline = time.monotonic() + 240
        while (job := client.get(f"/v1/tuning/jobs/{poison}").json())["status"] not in (
            "failed",
            "succeeded",
        ):
            assert time.monotonic() < deadline, f"the poison job never failed: {job}"
            holder = job_holder(client, poison) if job["status"] == "running" else None
            if holder in workers and holder not in killed:
                os.killpg(holder, signal.SIGKILL)
                workers.pop(holder).wait()
                killed.add(holder)
                worker = stack.enter_context(
                    running(["worker"], env, tmp_path / f"worker-{len(killed) + 1}.log")
                )
                workers[worker.pid] = worker
            time.sleep(0.1)

        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
        assert job["attempts"] == 3 and len(killed) == 3
        for job_id in others:
            done = wait_for_job(client, job_id, ("succeeded", "failed", "cancelled"), timeout=120)
            assert done["status"] == "succeeded", done
        assert client.get("/v1/prompts/poison").status_code == 404  # no version, not even an empty task
