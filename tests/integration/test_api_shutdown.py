"""SIGTERM to `softprompt api`: requests already in flight finish, new connections are refused, open event
streams end, and the process exits by itself. SIGTERM or SIGINT to `softprompt up` stops the worker and
the upload parser it started too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.helpers import sentiment_file
from tests.integration.processes import free_port, migrated_api_process, running, service_env, wait_ready
from tests.paths import REPO

pytestmark = pytest.mark.worker


def test_sigterm_lets_requests_in_flight_finish_then_the_api_exits(tmp_path, tiny_backbone_dir):
    port = free_port()
    with ExitStack() as stack:
        env = service_env(tmp_path / "data", tiny_backbone_dir, None)
        client, api = migrated_api_process(stack, env, port, tmp_path)
        dataset = client.post("/v1/datasets", files={"file": ("reviews.jsonl", sentiment_file())}).json()
        # No worker runs, so this job stays queued and its event stream stays open until the API stops.
        job = client.post(
            "/v1/tuning/jobs", json={"task": "reviews", "training_dataset": dataset["id"]}
        ).json()

        outcome: dict[str, object] = {}
        stream_open, upload_started = threading.Event(), threading.Event()

        def follow_events() -> None:
            headers = {"Accept": "text/event-stream"}
            with client.stream("GET", f"/v1/tuning/jobs/{job['id']}/events", headers=headers) as response:
                stream_open.set()
                outcome["stream"] = list(response.iter_lines())
            outcome["stream_ended_at"] = time.monotonic()

        def slow_upload() -> None:
            def body():  # the file arrives over two seconds, so the request is mid-body at the SIGTERM
                upload_started.set()
                lines = sentiment_file().splitlines(keepends=True)
                for line in lines:
                    time.sleep(2 / len(lines))
                    yield line

            boundary = "softprompt-test-boundary"
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="slow.jsonl"\r\n\r\n'
            )

            def multipart():
                yield head.encode()
                yield from body()
                yield f"\r\n--{boundary}--\r\n".encode()

            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/datasets",
                content=multipart(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                timeout=60,
            )
            outcome["upload"] = response.status_code

        threads = [threading.Thread(target=follow_events), threading.Thread(target=slow_upload)]
        for thread in threads:
            thread.start()
        assert stream_open.wait(30) and upload_started.wait(30)
        time.sleep(0.5)
        api.send_signal(signal.SIGTERM)
        sent = time.monotonic()

        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        for thread in threads:
            thread.join(timeout=60)
        # uvicorn re-raises the SIGTERM once it has shut down, so the exit status says what ended it.
        assert api.wait(timeout=60) == -signal.SIGTERM
        exited = time.monotonic()

        assert outcome["upload"] == 201  # accepted before the SIGTERM, so finished after it
        assert "event: shutdown" in outcome["stream"], outcome["stream"]
        assert outcome["stream_ended_at"] - sent < 10
        assert exited - sent < 15
        print(
            f"upload finished, stream closed {outcome['stream_ended_at'] - sent:.1f} s and process exited "
            f"{exited - sent:.1f} s after SIGTERM"
        )


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(
    ("command", "signum"), [("up", signal.SIGTERM), ("up", signal.SIGINT), ("api", signal.SIGTERM)]
)
def test_the_service_stops_its_worker_and_upload_parser_when_it_is_stopped(
    tmp_path, tiny_backbone_dir, command, signum
):
    """`up` has a worker and an upload parser; `api` an upload parser, which outlived it before."""
    port = free_port()
    env = service_env(tmp_path / "data", tiny_backbone_dir, None)
    if command == "api":
        subprocess.run([sys.executable, "-m", "app.cli", "db", "upgrade"], env=env, cwd=REPO, check=True)
    log = tmp_path / f"{command}.log"
    with running([command, "--port", str(port)], env, log) as up:
        client = wait_ready(f"http://127.0.0.1:{port}", up, log)
        # A file over a megabyte is parsed in a process of its own.
        lines = sentiment_file().rstrip(b"\n") + b"\n"
        large = lines * (2_000_000 // len(lines) + 1)
        uploaded = client.post("/v1/datasets", files={"file": ("big.jsonl", large)})
        assert uploaded.status_code == 201, uploaded.text
        children = _descendants(up.pid)
        assert len(children) >= (2 if command == "up" else 1), children  # the worker, the upload parser
        os.kill(up.pid, signum)  # the `up` process alone, as a terminal or a service manager would
        up.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in children if _alive(pid)]
        for pid in left:  # not to outlive the test when it fails
            os.kill(pid, signal.SIGKILL)
        assert not left, log.read_text()[-3000:]
