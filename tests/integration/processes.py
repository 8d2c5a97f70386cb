"""Real processes: the `softprompt` command started as a user would, with a tiny backbone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from tests.paths import REPO
from tests.stacks import Stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(data_dir: Path, backbone_dir: Path, stack: Stack | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTPROMPT_")}
    env.update(
        {
            "SOFTPROMPT_DATA_DIR": str(data_dir),
            "SOFTPROMPT_BACKBONES": f'{{"tiny": "{backbone_dir}"}}',
            "SOFTPROMPT_DEFAULT_BACKBONE": "tiny",
            "SOFTPROMPT_DEVICE": "cpu",
            "PYTHONUNBUFFERED": "1",
            **(stack.env() if stack else {}),
            **extra,
        }
    )
    return env


@contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop(process)


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_ready(base_url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> httpx.Client:
    deadline = time.monotonic() + timeout
    client = httpx.Client(base_url=base_url, timeout=60)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"service exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if client.get("/readyz").status_code == 200:
                return client
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"service not ready after {timeout} s:\n{log.read_text()[-4000:]}")


def wait_until(client: httpx.Client, path: str, done: Callable[[dict], bool], timeout: float = 180) -> dict:
    """GET ``path`` until ``done`` holds for its body; that body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(path).json()
        if done(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{path} still {body.get('status')} after {timeout} s: {body}")


def wait_for_job(client: httpx.Client, job_id: int, statuses: tuple[str, ...], timeout: float = 180) -> dict:
    return wait_until(client, f"/v1/tuning/jobs/{job_id}", lambda job: job["status"] in statuses, timeout)


def wait_for_evaluation(
    client: httpx.Client, evaluation_id: int, statuses: tuple[str, ...], timeout: float = 180
) -> dict:
    path = f"/v1/evaluations/{evaluation_id}"
    return wait_until(client, path, lambda evaluation: evaluation["status"] in statuses, timeout)


def migrated_api(stack: ExitStack, env: dict[str, str], port: int, tmp_path: Path) -> httpx.Client:
    """`softprompt db upgrade`, then `softprompt api` on ``port`` until ``stack`` closes; its client."""
    return migrated_api_process(stack, env, port, tmp_path)[0]


def migrated_api_process(
    stack: ExitStack, env: dict[str, str], port: int, tmp_path: Path
) -> tuple[httpx.Client, subprocess.Popen]:
    subprocess.run([sys.executable, "-m", "app.cli", "db", "upgrade"], env=env, cwd=REPO, check=True)
    api_log = tmp_path / "api.log"
    api = stack.enter_context(running(["api", "--port", str(port)], env, api_log))
    client = wait_ready(f"http://127.0.0.1:{port}", api, api_log)
    stack.callback(client.close)
    return client, api


def job_holder(client: httpx.Client, job_id: int) -> int:
    """The pid of the worker that last claimed the job, from its "running" events (worker host:pid:thread)."""
    events = client.get(f"/v1/tuning/jobs/{job_id}/events").json()
    claims = [
        e["data"]["worker"] for e in events if e["data"].get("status") == "running" and "worker" in e["data"]
    ]
    return int(claims[-1].split(":")[1])
