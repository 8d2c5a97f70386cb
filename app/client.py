"""A typed Python client for the native API (httpx), returning the same models the server answers with.

client = Client("http://127.0.0.1:8000", key="sp-...")
dataset = client.upload_dataset("train.jsonl")
job = client.create_job(task="sst2", training_dataset=dataset.id, template="Review: {input}\\nSentiment:")
for event in client.follow_job(job.id):
    print(event.type, event.data)
print(client.classify("sst2", "a gorgeous movie").results[0].label)
evaluation = client.create_evaluation(dataset=dataset.id, models=["sst2", None])
for evaluation in client.follow_evaluation(evaluation.id):
    print(evaluation.status, evaluation.progress.done, evaluation.progress.total)
print([(r.model, r.metrics["accuracy"]) for r in evaluation.results])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import connect_sse
from pydantic import BaseModel

from app.contract.kinds import FINISHED_STATUSES
from app.contract.schemas import (
    ClassifyResponse,
    DatasetPublic,
    EvaluationPublic,
    GenerateResponse,
    JobEventPublic,
    JobPublic,
    TaskPublic,
    VersionPublic,
)

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 120.0
# How long follow_job keeps trying to reopen a lost event stream (an API restart takes seconds).
RECONNECT_FOR_S = 60.0
T = TypeVar("T", bound=BaseModel)
PAGE = 100  # items per page when a list is followed to its end (the server's largest page)
RECONNECT_PAUSE_S = 1.0
# The server writes an evaluation's progress at most once a second: polling faster shows nothing new.
EVALUATION_POLL_S = 1.0


class ApiError(Exception):
    """An error the service answered with: its HTTP status and the body's code, message and param."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, line: int | None = None
    ):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.param, self.line = status, code, message, param, line

    @classmethod
    def of(cls, status: int, body: Any) -> ApiError:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(status, "http_error", f"HTTP {status}")
        return cls(
            status,
            error.get("code", "error"),
            error.get("message", ""),
            error.get("param"),
            error.get("line"),
        )


class Client:
    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, *, http: httpx.Client | None = None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = http or httpx.Client(base_url=url, timeout=TIMEOUT_S)
        self.http.headers.update(headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise ApiError.of(response.status_code, body)
        return response

    # -- datasets -----------------------------------------------------------------------------------------

    def upload_dataset(self, path: str | Path, *, name: str | None = None) -> DatasetPublic:
        path = Path(path)
        with path.open("rb") as file:
            data = {"name": name} if name else {}
            response = self._call("POST", "/v1/datasets", files={"file": (path.name, file)}, data=data)
        return DatasetPublic.model_validate(response.json())

    def list_datasets(self, *, limit: int = 20) -> list[DatasetPublic]:
        page = self._call("GET", "/v1/datasets", params={"limit": limit}).json()
        return [DatasetPublic.model_validate(d) for d in page["data"]]

    # -- tuning jobs --------------------------------------------------------------------------------------

    def create_job(self, *, task: str, training_dataset: int, **fields: Any) -> JobPublic:
        """Fields as POST /v1/tuning/jobs takes them (template, num_virtual_tokens, hyperparameters...)."""
        body = {"task": task, "training_dataset": training_dataset, **fields}
        return JobPublic.model_validate(self._call("POST", "/v1/tuning/jobs", json=body).json())

    def get_job(self, job_id: int) -> JobPublic:
        return JobPublic.model_validate(self._call("GET", f"/v1/tuning/jobs/{job_id}").json())

    def list_jobs(self, *, limit: int = 20) -> list[JobPublic]:
        page = self._call("GET", "/v1/tuning/jobs", params={"limit": limit}).json()
        return [JobPublic.model_validate(j) for j in page["data"]]

    def cancel_job(self, job_id: int) -> JobPublic:
        return JobPublic.model_validate(self._call("POST", f"/v1/tuning/jobs/{job_id}/cancel").json())

    def follow_job(
        self, job_id: int, *, after: int | None = None, reconnect_for_s: float = RECONNECT_FOR_S
    ) -> Iterator[JobEventPublic]:
        """The job's events as they happen, until it ends. A stream the server ends (a restart, a deploy)
        or the network drops is reopened after the last event seen, so none is lost or repeated; after
        ``reconnect_for_s`` without getting through, the last connection error is raised."""
        lost_since: float | None = None
        while True:
            params = {"after": after} if after is not None else {}
            failure: Exception | None = None
            try:
                with connect_sse(
                    self.http, "GET", f"/v1/tuning/jobs/{job_id}/events", params=params, timeout=None
                ) as source:
                    if source.response.is_error:
                        source.response.read()
                        raise ApiError.of(source.response.status_code, source.response.json())
                    lost_since = None
                    for sse in source.iter_sse():
                        if not sse.data:
                            # A keep-alive comment: the decoder reports it as an empty event once an id
                            # was seen (the last id carries over, as the SSE spec says).
                            continue
                        if sse.event == "end":
                            return
                        if sse.event == "error":
                            raise ApiError.of(401, json.loads(sse.data))
                        if sse.event == "shutdown":
                            break  # the server is stopping: reconnect from the last event
                        event = JobEventPublic.model_validate_json(sse.data)
                        after = event.id
                        yield event
            except httpx.TransportError as error:
                failure = error
            lost_since = lost_since if lost_since is not None else time.monotonic()
            if time.monotonic() - lost_since > reconnect_for_s:
                raise failure or ApiError(503, "stream_lost", "The job's event stream kept ending.")
            time.sleep(RECONNECT_PAUSE_S)

    # -- evaluations --------------------------------------------------------------------------------------

    def create_evaluation(self, *, dataset: int, models: list[str | None], **fields: Any) -> EvaluationPublic:
        """Models are 'task@3', 'task' or None (the bare backbone); fields as POST /v1/evaluations takes
        them (template, max_new_tokens)."""
        body = {"dataset": dataset, "models": models, **fields}
        return EvaluationPublic.model_validate(self._call("POST", "/v1/evaluations", json=body).json())

    def get_evaluation(self, evaluation_id: int) -> EvaluationPublic:
        return EvaluationPublic.model_validate(self._call("GET", f"/v1/evaluations/{evaluation_id}").json())

    def list_evaluations(self, *, limit: int = 20, task: str | None = None) -> list[EvaluationPublic]:
        params = {"limit": limit, "task": task} if task else {"limit": limit}
        page = self._call("GET", "/v1/evaluations", params=params).json()
        return [EvaluationPublic.model_validate(e) for e in page["data"]]

    def cancel_evaluation(self, evaluation_id: int) -> EvaluationPublic:
        response = self._call("POST", f"/v1/evaluations/{evaluation_id}/cancel")
        return EvaluationPublic.model_validate(response.json())

    def download_predictions(self, evaluation_id: int) -> bytes:
        """A succeeded evaluation's predictions as JSONL, one line per dataset row."""
        return self._call("GET", f"/v1/evaluations/{evaluation_id}/predictions").content

    def follow_evaluation(
        self, evaluation_id: int, *, reconnect_for_s: float = RECONNECT_FOR_S
    ) -> Iterator[EvaluationPublic]:
        """The evaluation each time its status or progress changes, until it ends (the last one yielded is
        the finished evaluation). Evaluations have no event stream, so this polls; a poll that finds no
        service (a restart) is tried again, and after ``reconnect_for_s`` the connection error is raised."""
        seen: tuple | None = None
        lost_since: float | None = None
        while True:
            try:
                evaluation = self.get_evaluation(evaluation_id)
            except httpx.TransportError:
                lost_since = lost_since if lost_since is not None else time.monotonic()
                if time.monotonic() - lost_since > reconnect_for_s:
                    raise
                time.sleep(RECONNECT_PAUSE_S)
                continue
            lost_since = None
            if (evaluation.status, evaluation.progress) != seen:
                seen = (evaluation.status, evaluation.progress)
                yield evaluation
            if evaluation.status in FINISHED_STATUSES:
                return
            time.sleep(EVALUATION_POLL_S)

    # -- prompts ------------------------------------------------------------------------------------------

    def list_tasks(self, *, limit: int | None = None) -> list[TaskPublic]:
        """Your tasks, newest first: all of them, a page at a time, or the first ``limit``."""
        return self._follow("/v1/prompts", TaskPublic, cursor=lambda t: t.id, limit=limit)

    def list_versions(self, task: str) -> list[VersionPublic]:
        """Every version of ``task``, newest first, a page at a time."""
        return self._follow(f"/v1/prompts/{task}/versions", VersionPublic, cursor=lambda v: v.version)

    def _follow(
        self, path: str, model: type[T], *, cursor: Callable[[T], int], limit: int | None = None
    ) -> list[T]:
        """A list route's items, page after page (``after`` the last one's ``cursor``), up to ``limit``."""
        items: list[T] = []
        params: dict[str, int] = {"limit": PAGE}
        while True:
            page = self._call("GET", path, params=params).json()
            items += [model.model_validate(item) for item in page["data"]]
            if not page["has_more"] or (limit is not None and len(items) >= limit):
                return items[:limit]
            params["after"] = cursor(items[-1])

    def get_task(self, task: str) -> TaskPublic:
        return TaskPublic.model_validate(self._call("GET", f"/v1/prompts/{task}").json())

    def export_peft(self, task: str, version: int) -> bytes:
        return self._call("GET", f"/v1/prompts/{task}/versions/{version}/peft").content

    def import_peft(
        self, task: str, path: str | Path, *, template: str | None = None, labels: list[str] | None = None
    ) -> VersionPublic:
        path = Path(path)
        form = {
            k: v
            for k, v in {"template": template, "labels": json.dumps(labels) if labels else None}.items()
            if v
        }
        with path.open("rb") as file:
            response = self._call(
                "POST", f"/v1/prompts/{task}/versions", files={"file": (path.name, file)}, data=form
            )
        return VersionPublic.model_validate(response.json())

    # -- inference ----------------------------------------------------------------------------------------

    def generate(self, task: str | None, input: str | list[str], **options: Any) -> GenerateResponse:
        """Options as POST /v1/generate takes them (max_new_tokens, temperature, top_p, stop, seed)."""
        body = {"task": task, "input": input, **options}
        return GenerateResponse.model_validate(self._call("POST", "/v1/generate", json=body).json())

    def classify(
        self, task: str | None, input: str | list[str], *, labels: list[str] | None = None
    ) -> ClassifyResponse:
        body = {"task": task, "input": input, "labels": labels}
        return ClassifyResponse.model_validate(self._call("POST", "/v1/classify", json=body).json())
