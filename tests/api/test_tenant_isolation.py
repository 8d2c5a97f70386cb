"""Tenants never see or touch each other's objects. The cases come from the application's route table: a
new route that takes an id or a task name is covered without anyone adding it here, and one this file
cannot fill in fails the test, asking for an example."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from sqlalchemy import text

from app.db.session import get_engine
from app.services.evaluation.evaluating import run_evaluation
from app.services.tuning.training import run_job
from tests.helpers import bearer, new_key, sentiment_file, upload

TEMPLATE = "Review: {input}\nSentiment:"
# Path parameters that name a tenant's object, and which of the objects below fills each.
PATH_REFERENCES = {
    "dataset_id": "dataset",
    "job_id": "job",
    "evaluation_id": "evaluation",
    "task": "task",
    "version": "version",
    # The OpenAI-compatible routes name the same objects their own way.
    "file_id": "file",
    "fine_tuning_job_id": "ftjob",
    "model": "model",
}
# Each JSON body a /v1 route takes: an example the caller could send, and its fields that name objects.
BODIES: dict[str, tuple[dict, dict[str, str]]] = {
    "JobCreate": (
        {"task": "mine", "training_dataset": "own:dataset", "template": TEMPLATE},
        {"training_dataset": "dataset", "validation_dataset": "dataset"},
    ),
    "EvaluationCreate": (
        {"dataset": "own:dataset", "models": "own:models"},
        {"dataset": "dataset", "models": "models"},
    ),
    "GenerateRequest": ({"task": "own:task", "input": "a fine film", "max_new_tokens": 2}, {"task": "task"}),
    "ClassifyRequest": ({"task": "own:task", "input": "a fine film"}, {"task": "task"}),
    "FineTuningJobCreate": (
        {"model": "tiny", "training_file": "own:file", "suffix": "mine"},
        {"training_file": "file", "validation_file": "file"},
    ),
    "CompletionCreate": (
        {"model": "own:model", "prompt": "a fine film", "max_tokens": 2},
        {"model": "model"},
    ),
    "ChatCompletionCreate": (
        {"model": "own:model", "messages": [{"role": "user", "content": "a fine film"}], "max_tokens": 2},
        {"model": "model"},
    ),
}
# Bodies that name no object (the uploads are files).
NO_REFERENCES = {
    "Body_upload_dataset_v1_datasets_post",
    "Body_import_peft_v1_prompts__task__versions_post",
    "Body_create_file_v1_files_post",
}
# Routes whose task name is where the caller's new object goes, not an object it reads: another tenant's
# name there makes the caller's own task (test_importing_into_a_name_another_tenant_uses_makes_your_own).
CREATES_IN = {("POST", "/v1/prompts/{task}/versions")}


@dataclass
class Owned:
    key: str
    dataset: int
    job: int
    task: str
    evaluation: int
    version: int = 1

    @property
    def models(self) -> list[str]:
        return [self.task]

    @property
    def file(self) -> str:
        return f"file-{self.dataset}"

    @property
    def ftjob(self) -> str:
        return f"ftjob-{self.job}"

    @property
    def model(self) -> str:
        return f"ft:tiny:{self.task}:{self.version}"


def make_objects(client, settings, backbone, key: str, task: str) -> Owned:
    headers = bearer(key)
    dataset = upload(client, sentiment_file(), headers=headers).json()["id"]
    body = {
        "task": task,
        "training_dataset": dataset,
        "template": TEMPLATE,
        "num_virtual_tokens": 4,
        "hyperparameters": {"steps": 2, "batch_size": 4},
    }
    job = client.post("/v1/tuning/jobs", json=body, headers=headers).json()["id"]
    assert run_job(db_url=settings.registry_url, job_id=job, backbone=backbone) == "succeeded"
    evaluation = client.post(
        "/v1/evaluations", json={"dataset": dataset, "models": [task]}, headers=headers
    ).json()["id"]
    assert (
        run_evaluation(db_url=settings.registry_url, evaluation_id=evaluation, backbone=backbone)
        == "succeeded"
    )
    return Owned(key=key, dataset=dataset, job=job, task=task, evaluation=evaluation)


@dataclass
class Case:
    route: RouteContext
    method: str
    path: str
    body: dict | None
    headers: dict[str, str]

    @property
    def name(self) -> str:
        return f"{self.method} {self.route.path} {self.body or ''} {self.headers}"


def v1_routes(app) -> list[RouteContext]:
    """The application's API routes as served (with their routers' prefixes)."""
    return [
        r
        for r in iter_route_contexts(app.routes)
        if isinstance(r.original_route, APIRoute) and r.path.startswith("/v1")
    ]


def path_params(route: RouteContext) -> list[str]:
    return re.findall(r"{(\w+)}", route.path)


def body_name(route: RouteContext) -> str | None:
    return route.body_field.field_info.annotation.__name__ if route.body_field is not None else None


def cross_tenant_cases(app, *, victim: Owned, caller: Owned) -> list[Case]:
    """Every way a request of ``caller`` can name one of ``victim``'s objects, one object at a time."""
    cases = []
    for route in v1_routes(app):
        params, body = path_params(route), body_name(route)
        unknown = [p for p in params if p not in PATH_REFERENCES]
        assert not unknown, f"{route.path}: add {unknown} to PATH_REFERENCES so tenants' isolation is tested"
        assert body is None or body in BODIES or body in NO_REFERENCES, (
            f"{route.path}: add an example body for {body} to BODIES so tenants' isolation is tested"
        )
        for method in route.methods:
            if (method, route.path) in CREATES_IN:
                continue
            example, references = BODIES.get(body, (None, {}))
            filled = _fill(example, caller) if example is not None else None
            if params:
                path = route.path.format(**{p: getattr(victim, PATH_REFERENCES[p]) for p in params})
                accepts = [{}, {"Accept": "text/event-stream"}] if method == "GET" else [{}]
                cases += [Case(route, method, path, filled, h) for h in accepts]
            for field, kind in references.items():
                cases.append(Case(route, method, route.path, {**filled, field: getattr(victim, kind)}, {}))
    return cases


def _fill(example: dict, owner: Owned) -> dict:
    """The example with "own:KIND" replaced by the caller's own object, so only one field is foreign."""
    return {
        k: getattr(owner, v.removeprefix("own:")) if isinstance(v, str) and v.startswith("own:") else v
        for k, v in example.items()
    }


def send(client, case: Case, key: str):
    # A fixed request id: the answer echoes it, so every header can be compared, byte for byte.
    headers = {**bearer(key), "X-Request-ID": "cross-tenant", **case.headers}
    return client.request(case.method, case.path, json=case.body, headers=headers)


def snapshot(response) -> tuple[int, bytes, list[tuple[str, str]]]:
    headers = sorted((k, v) for k, v in response.headers.items() if k != "date")
    return response.status_code, response.content, headers


def test_another_tenants_objects_answer_exactly_like_missing_ones(
    client, api_key, settings, stack, tiny_backbone
):
    acme = make_objects(client, settings, tiny_backbone, api_key, "acme-task")
    globex = make_objects(client, settings, tiny_backbone, new_key(stack, "globex"), "globex-task")
    # acme's prompt is resolved and its tensors cached in this process before globex asks for it.
    for route in ("/v1/generate", "/v1/classify"):
        assert client.post(route, json={"task": acme.task, "input": "fine"}).status_code == 200

    cases = cross_tenant_cases(client.app, victim=acme, caller=globex)
    routes = {(c.method, c.route.path) for c in cases}
    assert len(routes) >= 9 and len(cases) >= 14, sorted(routes)
    seen = {case.name: snapshot(send(client, case, globex.key)) for case in cases}
    for case in cases:
        assert seen[case.name][0] == 404, (case.name, seen[case.name])

    # Nothing of acme's was changed or deleted by those requests.
    assert client.get(f"/v1/datasets/{acme.dataset}").status_code == 200
    assert client.get(f"/v1/prompts/{acme.task}/versions/1").status_code == 200
    assert client.get(f"/v1/tuning/jobs/{acme.job}").json()["status"] == "succeeded"
    assert client.get(f"/v1/evaluations/{acme.evaluation}").json()["status"] == "succeeded"

    # Now make acme's objects truly unknown: globex's answers must not change by a single byte.
    with get_engine(settings.registry_url).begin() as connection:
        owner = "(SELECT id FROM tenants WHERE name = 'acme')"
        for statement in (
            f"DELETE FROM evaluations WHERE tenant_id = {owner}",
            f"DELETE FROM prompt_versions WHERE task_id IN (SELECT id FROM tasks WHERE tenant_id = {owner})",
            f"DELETE FROM tasks WHERE tenant_id = {owner}",
            f"DELETE FROM job_events WHERE job_id IN (SELECT id FROM tuning_jobs WHERE tenant_id = {owner})",
            f"DELETE FROM tuning_jobs WHERE tenant_id = {owner}",
            f"DELETE FROM datasets WHERE tenant_id = {owner}",
        ):
            connection.execute(text(statement))
    for case in cases:
        assert snapshot(send(client, case, globex.key)) == seen[case.name], case.name
    print(f"cross-tenant: {len(routes)} routes, {len(cases)} cases")


@pytest.mark.servers
def test_lists_show_only_the_callers_objects(client, api_key, settings, stack, tiny_backbone):
    acme = make_objects(client, settings, tiny_backbone, api_key, "shared")
    globex = make_objects(client, settings, tiny_backbone, new_key(stack, "globex"), "shared")
    lists = [r for r in v1_routes(client.app) if "GET" in r.methods and not path_params(r)]
    assert {r.path for r in lists} >= {
        "/v1/datasets",
        "/v1/tuning/jobs",
        "/v1/evaluations",
        "/v1/prompts",
        "/v1/models",
    }
    for route in lists:
        mine, theirs = (
            # /v1/models also lists the backbones, which every tenant shares.
            [
                d
                for d in client.get(route.path, headers=bearer(t.key)).json()["data"]
                if d.get("owned_by") != "softprompt"
            ]
            for t in (acme, globex)
        )
        assert len(mine) == len(theirs) == 1, route.path
        assert mine != theirs, route.path  # same task name, different objects
    # Both tenants own a task named "shared", each with its own version 1.
    ours = client.get("/v1/prompts/shared/versions/1", headers=bearer(acme.key)).json()
    their = client.get("/v1/prompts/shared/versions/1", headers=bearer(globex.key)).json()
    assert ours["source_job"] == acme.job and their["source_job"] == globex.job


@pytest.mark.servers
def test_an_idempotency_key_is_the_tenants_own(client, stack):
    other = new_key(stack, "globex")
    headers = {"Idempotency-Key": "upload-1"}
    first = upload(client, sentiment_file(), headers=headers)
    again = upload(client, sentiment_file(), headers={**headers, **bearer(other)})
    assert first.status_code == again.status_code == 201  # not 200 with acme's dataset, not 409
    assert first.json()["id"] != again.json()["id"]


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_every_v1_route_needs_a_key_once_keys_exist(client, method):
    routes = [r for r in v1_routes(client.app) if method in r.methods]
    for route in routes:
        path = route.path.format(**{p: 1 for p in path_params(route)})
        response = client.request(method, path, headers={"Authorization": ""})
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_importing_into_a_name_another_tenant_uses_makes_your_own(
    client, api_key, settings, stack, tiny_backbone
):
    acme = make_objects(client, settings, tiny_backbone, api_key, "sentiment")
    globex = bearer(new_key(stack, "globex"))
    exported = client.get(f"/v1/prompts/{acme.task}/versions/1/peft").content
    imported = client.post(
        "/v1/prompts/sentiment/versions", files={"file": ("a.zip", exported)}, headers=globex
    )
    assert imported.status_code == 201 and imported.json()["version"] == 1  # globex's own first version
    assert [v["version"] for v in client.get("/v1/prompts/sentiment").json()["versions"]] == [1]
    assert client.get("/v1/prompts/sentiment/versions/1").json()["source_job"] == acme.job
