"""/v1/models, and what a `model` names: a base backbone, or a tuned task version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from app.api.auth import CallerDep
from app.api.deps import SessionDep, SettingsDep
from app.api.openai import ids
from app.api.openai.schemas import Deleted, ListOf, ModelObject
from app.api.responses import errors
from app.errors import InvalidRequest, NotFound
from app.services.registry import prompts
from app.services.registry.model_names import fine_tuned_model, missing, task_ref_of_model
from app.services.tenancy.tenants import Caller

router = APIRouter(prefix="/v1/models", tags=["OpenAI-compatible"])
BACKBONE_OWNER = "softprompt"
MODELS_PAGE = 100
MODELS_PAGE_MAX = 1000


def _version_of(session: Session, caller: Caller, model: str, backbones: set[str]):
    backbone, ref = task_ref_of_model(model, backbones)
    if ref is None:
        return None
    try:
        name, version = prompts.parse_task_ref(ref)
        found = prompts.get_version(session, tenant_id=caller.tenant_id, name=name, version=version)
    except (NotFound, InvalidRequest):
        raise missing(model) from None
    if backbone is not None and backbone != found.base_model:
        raise missing(model)
    return found


@router.get("", response_model=ListOf, responses=errors(401, 404, 422))
def list_models(
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=MODELS_PAGE_MAX, description="Page size.")] = MODELS_PAGE,
    after: Annotated[
        str | None, Query(max_length=300, description="The last model id of the previous page.")
    ] = None,
) -> ListOf:
    """The base backbones, then your tasks' versions as ft:<backbone>:<task>:<version>, newest first, a page
    at a time (``has_more``; the next page starts ``after`` this page's last id). A task's plain name
    ('sst2') is accepted as a model too and means its newest version."""
    backbones = sorted(settings.backbones)
    data: list[ModelObject] = []
    last = None
    if after is None or after in backbones:
        start = 0 if after is None else backbones.index(after) + 1
        shown = backbones[start : start + limit]
        data = [ModelObject(id=name, created=0, owned_by=BACKBONE_OWNER) for name in shown]
    else:
        last = _version_of(session, caller, after, set(backbones))
        if last is None:  # a task's plain name is no place in the list
            raise missing(after)
    versions, has_more = (
        prompts.list_versions(session, tenant_id=caller.tenant_id, limit=limit - len(data), after=last)
        if len(data) < limit
        else ([], True)
    )
    data += [
        ModelObject(
            id=fine_tuned_model(v.base_model, v.task.name, v.version),
            created=ids.unix(v.created_at),
            owned_by=caller.tenant,
        )
        for v in versions
    ]
    return ListOf(data=data, has_more=has_more)


@router.get("/{model}", response_model=ModelObject, responses=errors(401, 404))
def retrieve_model(model: str, caller: CallerDep, session: SessionDep, settings: SettingsDep) -> ModelObject:
    """A backbone or one of your tuned models."""
    version = _version_of(session, caller, model, set(settings.backbones))
    if version is None:
        return ModelObject(id=model, created=0, owned_by=BACKBONE_OWNER)
    return ModelObject(id=model, created=ids.unix(version.created_at), owned_by=caller.tenant)


@router.delete("/{model}", response_model=Deleted, responses=errors(401, 404, 422))
def delete_model(model: str, caller: CallerDep, session: SessionDep, settings: SettingsDep) -> Deleted:
    """Delete one tuned version, named ft:<backbone>:<task>:<version> (or task@version)."""
    backbones = set(settings.backbones)
    if model in backbones:
        raise InvalidRequest(f"{model!r} is a base model; only tuned models can be deleted.", param="model")
    if task_ref_of_model(model, backbones)[1] == model and "@" not in model:
        raise InvalidRequest(
            f"{model!r} names a task's newest version; name the version to delete: ft:<backbone>:{model}:N.",
            param="model",
        )
    version = _version_of(session, caller, model, backbones)
    prompts.delete_version(
        session, tenant_id=caller.tenant_id, name=version.task.name, version=version.version
    )
    return Deleted(id=model, object="model")
