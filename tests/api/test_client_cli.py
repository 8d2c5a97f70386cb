"""The `softprompt` client commands against a real server, as a person at a terminal uses them."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.client import ApiError, Client
from app.db.models import TuningJob
from app.db.session import session_scope
from app.services import training
from app.services.training import run_job
from tests.helpers import TEMPLATE, sentiment_file


@pytest.fixture
def softprompt(server, api_key):
    runner = CliRunner()
    env = {"SOFTPROMPT_URL": server, "SOFTPROMPT_API_KEY": api_key, "COLUMNS": "120"}
    return lambda *args: runner.invoke(cli, list(args), env=env)


def worker_thread(settings, backbone) -> threading.Thread:
    """Stands in for the worker: runs the first job that appears, in this process."""

    def work() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with session_scope(settings.registry_url) as session:
                job = session.query(TuningJob).filter_by(status="queued").first()
                job_id = job.id if job else None
            if job_id is not None:
                run_job(db_url=settings.registry_url, job_id=job_id, backbone=backbone)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_upload_tune_follow_then_use_the_task(softprompt, settings, tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "PROGRESS_INTERVAL_S", 0.0)  # every step reported, for the bar
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(sentiment_file())
    uploaded = softprompt("datasets", "upload", str(data))
    assert uploaded.exit_code == 0, uploaded.output
    dataset = re.match(
        r"dataset (\d+): 20 classification examples, labels negative, positive", uploaded.stdout
    )
    assert dataset, uploaded.stdout

    worker = worker_thread(settings, tiny_backbone)
    tuned = softprompt(
        "tune",
        "--task", "sst2",
        "--dataset", dataset[1],
        "--template", TEMPLATE,
        "--virtual-tokens", "4",
        "--steps", "12",
        "--batch-size", "4",
        "--learning-rate", "0.3",
        "--follow",
    )  # fmt: skip
    worker.join()
    assert tuned.exit_code == 0, tuned.output
    assert re.search(r"job \d+ succeeded: sst2@1, validation accuracy \d\.\d{3}", tuned.stdout), tuned.stdout
    assert "step 12/12" in tuned.stderr and "loss " in tuned.stderr  # the progress bar, at its end

    classified = softprompt("classify", "--task", "sst2", "a wonderful, moving film", "dull and far too long")
    assert classified.exit_code == 0, classified.output
    assert [line.split("\t")[0] for line in classified.stdout.splitlines()] == ["positive", "negative"]
    generated = softprompt("generate", "--task", "sst2", "--max-new-tokens", "3", "a fine film")
    assert generated.exit_code == 0 and generated.stdout.strip()

    assert re.search(r"^\d+\tsst2\tsucceeded\t12/12$", softprompt("jobs", "list").stdout, re.M)
    assert re.search(r"^sst2\t1\t", softprompt("prompts", "list").stdout, re.M)

    zipped = tmp_path / "sst2.zip"
    assert softprompt("export", "sst2", "1", "-o", str(zipped)).exit_code == 0
    imported = softprompt("import", "copy", str(zipped), "--labels", "negative,positive")
    assert imported.exit_code == 0 and imported.stdout.strip() == "imported copy@1", imported.output
    again = softprompt("classify", "--task", "copy", "a wonderful, moving film", "dull and far too long")
    assert again.stdout == classified.stdout  # the same prompt, the same answers


def test_errors_name_what_was_wrong_and_exit_1(softprompt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\nnot json\n')
    refused = softprompt("datasets", "upload", str(bad))
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: invalid_json (line 2): Line 2 is not valid JSON")

    missing = softprompt("classify", "--task", "nope", "text")
    assert missing.exit_code == 1 and "error: not_found (task): No task named 'nope'." in missing.stderr

    away = softprompt("jobs", "list", "--url", "http://127.0.0.1:9")
    assert away.exit_code == 1 and away.stderr.startswith("error: cannot reach http://127.0.0.1:9")


def test_the_client_raises_the_services_error(server):
    with Client(server, key="sp-wrong") as client, pytest.raises(ApiError) as refused:
        client.list_tasks()
    assert refused.value.status == 401 and refused.value.code == "unauthorized"


def sse(event_id: int, message: str) -> str:
    body = {
        "id": event_id,
        "type": "status",
        "message": message,
        "data": {},
        "created_at": "2026-01-01T00:00:00Z",
    }
    return f"id: {event_id}\r\nevent: status\r\ndata: {json.dumps(body)}\r\n\r\n"


def test_following_a_job_skips_keep_alive_pings():
    """The server pings every 15 s, between events; the client must not take a ping for an event."""
    stream = sse(1, "Job queued.") + ": ping - 2026-01-01\r\n\r\nevent: end\r\ndata: {}\r\n\r\n"
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, text=stream, headers={"content-type": "text/event-stream"})
    )
    with Client(http=httpx.Client(base_url="http://service", transport=transport)) as client:
        assert [e.message for e in client.follow_job(1)] == ["Job queued."]


class DroppedAfter(httpx.SyncByteStream):
    """A stream that delivers some events, then loses the connection."""

    def __init__(self, text: str):
        self.text = text

    def __iter__(self):
        yield self.text.encode()
        raise httpx.ReadError("connection reset by peer")


def test_following_a_job_reopens_a_dropped_stream_after_the_last_event(monkeypatch):
    monkeypatch.setattr("app.client.RECONNECT_PAUSE_S", 0.01)
    asked: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.params.get("after"))
        headers = {"content-type": "text/event-stream"}
        if len(asked) == 1:
            return httpx.Response(200, headers=headers, stream=DroppedAfter(sse(1, "queued")))
        if len(asked) == 2:
            raise httpx.ConnectError("connection refused")  # the API restarting
        return httpx.Response(200, headers=headers, text=sse(2, "running") + "event: end\r\ndata: {}\r\n\r\n")

    http = httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer))
    with Client(http=http) as client:
        assert [e.message for e in client.follow_job(1)] == ["queued", "running"]
    assert asked == [None, "1", "1"]


def test_following_a_job_gives_up_when_the_service_stays_away(monkeypatch):
    monkeypatch.setattr("app.client.RECONNECT_PAUSE_S", 0.01)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    http = httpx.Client(base_url="http://service", transport=httpx.MockTransport(refuse))
    with Client(http=http) as client, pytest.raises(httpx.ConnectError):
        list(client.follow_job(1, reconnect_for_s=0.1))


def test_tune_takes_the_method(softprompt, tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(sentiment_file())
    dataset = re.match(r"dataset (\d+)", softprompt("datasets", "upload", str(data)).stdout)[1]
    tuned = softprompt("tune", "--task", "deep", "--dataset", dataset, "--method", "prefix")
    assert tuned.exit_code == 0, tuned.output
    job_id = re.match(r"job (\d+) queued", tuned.stdout)[1]
    assert json.loads(softprompt("jobs", "show", job_id).stdout)["method"] == "prefix"
    wrong = softprompt("tune", "--task", "deep", "--dataset", dataset, "--method", "lora")
    assert wrong.exit_code != 0 and "lora" in wrong.output
