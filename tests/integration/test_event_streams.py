"""Job event streams are capped per tenant (SOFTPROMPT_TENANT_MAX_EVENT_STREAMS): past the cap a stream is
429 at once, and a closed stream frees its place. A real API process: the streams stay open for as long
as the job is queued."""

from __future__ import annotations

import contextlib
import time
from contextlib import ExitStack

import httpx
import pytest

from tests.helpers import sentiment_file
from tests.integration.processes import free_port, migrated_api, service_env

pytestmark = pytest.mark.worker
STREAM = {"Accept": "text/event-stream"}


def test_a_tenant_past_its_stream_cap_is_refused_at_once_and_a_closed_stream_frees_a_place(
    tmp_path, tiny_backbone_dir
):
    port = free_port()
    env = service_env(tmp_path / "data", tiny_backbone_dir, None, SOFTPROMPT_TENANT_MAX_EVENT_STREAMS="2")
    with ExitStack() as stack:
        client = migrated_api(stack, env, port, tmp_path)
        dataset = client.post("/v1/datasets", files={"file": ("reviews.jsonl", sentiment_file())}).json()
        # No worker runs: the job stays queued, and its streams stay open.
        job = client.post(
            "/v1/tuning/jobs", json={"task": "streams", "training_dataset": dataset["id"]}
        ).json()
        path = f"/v1/tuning/jobs/{job['id']}/events"
        streams = [httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) for _ in range(3)]
        for c in streams:
            stack.callback(c.close)
        first = stack.enter_context(streams[0].stream("GET", path, headers=STREAM))
        second = stack.enter_context(streams[1].stream("GET", path, headers=STREAM))
        assert first.status_code == second.status_code == 200
        refused = streams[2].get(path, headers=STREAM)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
        assert "Retry-After" in refused.headers
        assert client.get(path).status_code == 200  # the events as a list are not a stream
        first.close()
        streams[0].close()
        deadline = time.monotonic() + 10  # the server notices the closed connection at its next poll
        while True:
            request = streams[2].build_request("GET", path, headers=STREAM)
            third = stack.enter_context(contextlib.closing(streams[2].send(request, stream=True)))
            if third.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert third.status_code == 200, third.status_code
