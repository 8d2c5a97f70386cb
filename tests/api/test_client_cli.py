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
from app.db.models import Evaluation, TuningJob
from app.db.session import session_scope
from app.services.evaluation.evaluating import run_evaluation
from app.services.runs import lifecycle as runs
from app.services.tuning.training import run_job
from tests.helpers import TEMPLATE, jsonl, sentiment_file, upload


@pytest.fixture
def softprompt(server, api_key):
    runner = CliRunner()
    env = {"SOFTPROMPT_URL": server, "SOFTPROMPT_API_KEY": api_key, "COLUMNS": "120"}
    return lambda *args: runner.invoke(cli, list(args), env=env)


RUNS = {
    TuningJob: lambda db_url, row_id, backbone: run_job(db_url=db_url, job_id=row_id, backbone=backbone),
    Evaluation: lambda db_url, row_id, backbone: run_evaluation(
        db_url=db_url, evaluation_id=row_id, backbone=backbone
    ),
}


def worker_thread(settings, backbone, table: type = TuningJob) -> threading.Thread:
    """Stands in for the worker: runs the first job (or evaluation) that appears, in this process."""

    def work() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with session_scope(settings.registry_url) as session:
                row = session.query(table).filter_by(status="queued").first()
                row_id = row.id if row else None
            if row_id is not None:
                RUNS[table](settings.registry_url, row_id, backbone)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_upload_tune_follow_then_use_the_task(softprompt, settings, tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "PROGRESS_INTERVAL_S", 0.0)  # every step reported, for the bar
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


# -- evaluations ------------------------------------------------------------------------------------------


@pytest.fixture
def quick_evaluations(monkeypatch):
    """Progress written at every chunk and polled often, so the bar moves within a short test."""
    monkeypatch.setattr(runs, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr("app.client.EVALUATION_POLL_S", 0.05)


def table(stdout: str) -> dict[str, list[str]]:
    """The metrics table printed after the status line: its first cell to the others, header row included."""
    lines = stdout.splitlines()[1:]
    rows = [line.split() for line in lines if line.strip() and not set(line.strip()) <= set("─━")]
    return {row[0]: row[1:] for row in rows}


def test_eval_shows_progress_then_the_models_side_by_side(
    softprompt, client, settings, tiny_backbone, trained, quick_evaluations, tmp_path
):
    test_set = upload(client, sentiment_file(), filename="test.jsonl").json()["id"]
    worker = worker_thread(settings, tiny_backbone, Evaluation)
    ran = softprompt("eval", str(test_set), "sst2", "bare")
    worker.join()
    assert ran.exit_code == 0, ran.output
    evaluation_id = re.match(r"evaluation (\d+) queued: sst2@1, bare\n", ran.stdout)[1]
    assert "rows 40/40" in ran.stderr  # the progress bar at its end: 20 rows, 2 models

    shown = ran.stdout.split("\n", 1)[1]
    assert shown.startswith(f"evaluation {evaluation_id} succeeded on dataset {test_set}\n")
    results = client.get(f"/v1/evaluations/{evaluation_id}").json()["results"]
    trained_metrics, bare_metrics = results[0]["metrics"], results[1]["metrics"]
    assert table(shown) == {
        "metric": ["sst2@1", "bare"],
        "accuracy": [f"{trained_metrics['accuracy']:.3f}", f"{bare_metrics['accuracy']:.3f}"],
        "macro_f1": [f"{trained_metrics['macro_f1']:.3f}", f"{bare_metrics['macro_f1']:.3f}"],
    }  # per_label and confusion_matrix are left out
    assert softprompt("evals", "show", evaluation_id).stdout == shown

    listed = softprompt("evals", "list", "--task", "sst2").stdout
    headline = f"accuracy {trained_metrics['accuracy']:.3f}/{bare_metrics['accuracy']:.3f}"
    assert listed == f"{evaluation_id}\tsucceeded\t{test_set}\tsst2@1,bare\t40/40\t{headline}\n"

    saved = tmp_path / "predictions.jsonl"
    written = softprompt("evals", "predictions", evaluation_id, "-o", str(saved))
    assert written.stdout == f"wrote {saved} (20 rows)\n"
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [p["model"] for p in rows[0]["predictions"]] == ["sst2@1", None]


def test_eval_of_the_bare_backbone_on_a_generation_set(
    softprompt, client, settings, tiny_backbone, quick_evaluations
):
    references = jsonl({"input": f"count {i}", "references": [f"{i} {i + 1}"]} for i in range(5))
    test_set = upload(client, references, filename="test.jsonl").json()["id"]
    worker = worker_thread(settings, tiny_backbone, Evaluation)
    ran = softprompt("eval", str(test_set), "-", "--template", "Count: {input}\n", "--max-new-tokens", "4")
    worker.join()
    assert ran.exit_code == 0, ran.output
    evaluation_id = re.match(r"evaluation (\d+) queued: bare\n", ran.stdout)[1]

    shown = json.loads(softprompt("evals", "show", evaluation_id, "--json").stdout)
    assert (shown["template"], shown["max_new_tokens"]) == ("Count: {input}\n", 4)
    metrics = shown["results"][0]["metrics"]
    figures = table(ran.stdout.split("\n", 1)[1])
    # BLEU first, the generation figures at two decimals; the sacrebleu signatures are left out.
    assert list(figures) == ["metric", "bleu", "chrf", "rouge_l", "exact_match", "f1"]
    assert all(figures[name] == [f"{metrics[name]:.2f}"] for name in list(figures)[1:])


def test_eval_without_waiting_then_cancel(softprompt, client, trained):
    test_set = upload(client, sentiment_file(), filename="test.jsonl").json()["id"]
    queued = softprompt("eval", str(test_set), "sst2@1", "--no-wait")
    assert queued.exit_code == 0, queued.output
    evaluation_id = re.fullmatch(r"evaluation (\d+) queued: sst2@1\n", queued.stdout)[1]
    shown = softprompt("evals", "show", evaluation_id)
    assert shown.stdout == f"evaluation {evaluation_id} queued on dataset {test_set}: 0/20 rows\n"
    assert softprompt("evals", "list", "--task", "other").stdout == ""

    assert softprompt("evals", "cancel", evaluation_id).stdout == f"evaluation {evaluation_id} cancelled\n"
    again = softprompt("evals", "cancel", evaluation_id)
    assert again.exit_code == 1 and again.stderr.startswith("error: evaluation_finished")
    followed = softprompt("evals", "follow", evaluation_id)  # ended already: no table, exit 1
    assert followed.exit_code == 1 and f"evaluation {evaluation_id} cancelled on dataset" in followed.stderr
    assert followed.stdout == ""
    early = softprompt("evals", "predictions", evaluation_id)
    assert early.exit_code == 1 and early.stderr.startswith("error: evaluation_not_finished")

    unknown = softprompt("eval", str(test_set), "nope")
    assert unknown.exit_code == 1 and unknown.stderr.startswith("error: not_found (models[0])")


def evaluation_body(status: str, done: int) -> dict:
    return {
        "id": 1,
        "status": status,
        "dataset": 1,
        "kind": "classification",
        "base_model": "tiny",
        "template": "{input}",
        "max_new_tokens": 64,
        "progress": {"done": done, "total": 4},
        "results": [],
        "error": None,
        "attempts": 1,
        "created_at": "2026-01-01T00:00:00Z",
        "started_at": None,
        "finished_at": None,
    }


def test_following_an_evaluation_reports_each_change_once_and_outlasts_a_restart(monkeypatch):
    monkeypatch.setattr("app.client.EVALUATION_POLL_S", 0.0)
    monkeypatch.setattr("app.client.RECONNECT_PAUSE_S", 0.0)
    answers = iter([("queued", 0), ("running", 0), ("running", 0), None, ("running", 2), ("succeeded", 4)])

    def answer(request: httpx.Request) -> httpx.Response:
        polled = next(answers)
        if polled is None:
            raise httpx.ConnectError("connection refused")  # the API restarting
        return httpx.Response(200, json=evaluation_body(*polled))

    http = httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer))
    with Client(http=http) as client:
        seen = [(e.status, e.progress.done) for e in client.follow_evaluation(1)]
    assert seen == [("queued", 0), ("running", 0), ("running", 2), ("succeeded", 4)]
