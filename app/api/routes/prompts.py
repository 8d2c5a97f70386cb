from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from app.api.auth import CallerDep
from app.api.deps import AfterQuery, IdPath, LimitQuery, MetricsDep, ServingDep, SessionDep, SettingsDep
from app.api.responses import errors
from app.contract.schemas import TASK_VERSIONS_SHOWN, Page, TaskPublic, VersionPublic
from app.errors import InvalidRequest
from app.input_text import check_json, load_json
from app.services.evaluation import evaluations
from app.services.registry import adapters
from app.services.registry import prompts as service

router = APIRouter(prefix="/v1/prompts", tags=["prompt registry"])


@router.get("", response_model=Page[TaskPublic], responses=errors(401, 422))
def list_tasks(
    caller: CallerDep, session: SessionDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> Page[TaskPublic]:
    """List your tasks with their newest versions, newest task first."""
    rows, has_more = service.list_tasks(session, tenant_id=caller.tenant_id, limit=limit, after=after)
    return Page[TaskPublic](data=[_task(session, row) for row in rows], has_more=has_more)


@router.get("/{task}", response_model=TaskPublic, responses=errors(401, 404))
def get_task(task: str, caller: CallerDep, session: SessionDep) -> TaskPublic:
    """Get a task and its newest versions."""
    return _task(session, service.get_task(session, tenant_id=caller.tenant_id, name=task))


def _task(session, row) -> TaskPublic:
    versions, count = service.newest_versions(session, task=row, limit=TASK_VERSIONS_SHOWN)
    return TaskPublic.of(row, versions, count)


@router.get("/{task}/versions", response_model=Page[VersionPublic], responses=errors(401, 404, 422))
def list_versions(
    task: str, caller: CallerDep, session: SessionDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> Page[VersionPublic]:
    """A task's versions, newest first; ``after`` is the last version number of the previous page."""
    rows, has_more = service.list_task_versions(
        session, tenant_id=caller.tenant_id, name=task, limit=limit, after=after
    )
    return Page[VersionPublic](data=[VersionPublic.of(r, task) for r in rows], has_more=has_more)


@router.get("/{task}/versions/{version}", response_model=VersionPublic, responses=errors(401, 404))
def get_version(task: str, version: IdPath, caller: CallerDep, session: SessionDep) -> VersionPublic:
    """Get one immutable prompt version: template, labels, metrics, source job, checksum."""
    found = service.get_version(session, tenant_id=caller.tenant_id, name=task, version=version)
    return VersionPublic.of(
        found, task, evaluations=evaluations.evaluations_of_version(session, version=found)
    )


@router.delete("/{task}/versions/{version}", status_code=204, responses=errors(401, 404))
def delete_version(
    task: str, version: IdPath, caller: CallerDep, session: SessionDep, metrics: MetricsDep
) -> Response:
    """Delete a version; its number is never reused."""
    left = service.delete_version(session, tenant_id=caller.tenant_id, name=task, version=version)
    if not left:  # the task serves nothing any more: its metrics series go too
        metrics.forget_task(tenant=caller.tenant, task=task)
    return Response(status_code=204)


@router.get(
    "/{task}/versions/{version}/peft",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {}}, "description": "A PEFT prompt-tuning adapter, zipped."},
        **errors(401, 404, 422),
    },
)
def export_peft(task: str, version: IdPath, caller: CallerDep, session: SessionDep, serving: ServingDep):
    """Download a version as a PEFT prompt-tuning adapter: `adapter_config.json` and
    `adapter_model.safetensors` (`prompt_embeddings`), plus `softprompt.json` with the template and labels."""
    found = adapters.export_version(
        session, tenant_id=caller.tenant_id, name=task, version=version, backbone=serving.backbone
    )
    disposition = f'attachment; filename="{found.filename}"'
    return Response(found.data, media_type="application/zip", headers={"Content-Disposition": disposition})


@router.post(
    "/{task}/versions", status_code=201, response_model=VersionPublic, responses=errors(401, 413, 422)
)
def import_peft(
    task: str,
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    serving: ServingDep,
    file: Annotated[UploadFile, File(description="A zip of a PEFT prompt-tuning adapter (safetensors).")],
    template: Annotated[
        str | None, Form(description="The text around each input, with {input}; default: the zip's own.")
    ] = None,
    labels: Annotated[
        str | None,
        Form(description='A JSON list of labels for classification, e.g. ["negative", "positive"].'),
    ] = None,
) -> VersionPublic:
    """Import a PEFT prompt-tuning adapter as the task's next version (the task is made if it is new)."""
    backbone = serving.require_backbone()
    row = adapters.import_version(
        session,
        caller=caller,
        name=task,
        data=file.file.read(),  # a plain function: FastAPI runs it, unzipping included, off the event loop
        template=template,
        labels=_labels(labels),
        backbone=backbone,
        settings=settings,
        prompt_fault=lambda prompt: serving.prompt_fault(prompt, tenant_id=caller.tenant_id),
    )
    return VersionPublic.of(row, task)


def _labels(text: str | None) -> list | None:
    if text is None or not text.strip():
        return None
    labels = load_json(text, param="labels")
    if not isinstance(labels, list):
        raise InvalidRequest('labels must be a JSON list, e.g. ["negative", "positive"].', param="labels")
    check_json(labels, prefix="labels")  # the form field was text; what its JSON decodes to is checked here
    return labels
