from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.auth import CallerDep
from app.api.deps import AfterQuery, IdPath, LimitQuery, SessionDep
from app.api.responses import errors
from app.api.schemas import Page, TaskPublic, VersionPublic
from app.services import prompts as service

router = APIRouter(prefix="/v1/prompts", tags=["prompt registry"])


@router.get("", response_model=Page[TaskPublic], responses=errors(401, 422))
def list_tasks(
    caller: CallerDep, session: SessionDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> Page[TaskPublic]:
    """List your tasks with their versions, newest task first."""
    rows, has_more = service.list_tasks(session, tenant_id=caller.tenant_id, limit=limit, after=after)
    return Page[TaskPublic](data=[TaskPublic.of(r) for r in rows], has_more=has_more)


@router.get("/{task}", response_model=TaskPublic, responses=errors(401, 404))
def get_task(task: str, caller: CallerDep, session: SessionDep) -> TaskPublic:
    """Get a task and all its versions."""
    return TaskPublic.of(service.get_task(session, tenant_id=caller.tenant_id, name=task))


@router.get("/{task}/versions/{version}", response_model=VersionPublic, responses=errors(401, 404))
def get_version(task: str, version: IdPath, caller: CallerDep, session: SessionDep) -> VersionPublic:
    """Get one immutable prompt version: template, labels, metrics, source job, checksum."""
    found = service.get_version(session, tenant_id=caller.tenant_id, name=task, version=version)
    return VersionPublic.of(found, task)


@router.delete("/{task}/versions/{version}", status_code=204, responses=errors(401, 404))
def delete_version(task: str, version: IdPath, caller: CallerDep, session: SessionDep) -> Response:
    """Delete a version; its number is never reused."""
    service.delete_version(session, tenant_id=caller.tenant_id, name=task, version=version)
    session.commit()
    return Response(status_code=204)
