"""SIGTERM to `softprompt api`: requests already in flight finish, new connections are refused, open event
streams end, and the process exits by itself."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import ExitStack

import httpx
import pytest

from tests.helpers import sentiment_file
from tests.integration.processes import free_port, migrated_api_process, service_env

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
