"""/v1/models, and what a `model` names: a base backbone, or a tuned task version."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.orm import Session

from app.api.auth import CallerDep
from app.api.deps import SessionDep, SettingsDep
from app.api.openai import ids
from app.api.openai.schemas import Deleted, ListOf, ModelObject
from app.api.responses import errors
from app.errors import InvalidRequest, NotFound
from app.services import prompts
from app.services.model_names import fine_tuned_model, missing, task_ref_of_model
from app.services.tenants import Caller

router = APIRouter(prefix="/v1/models", tags=["OpenAI-compatible"])
BACKBONE_OWNER = "softprompt"
TASK_PAGE = 100


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


@router.get("", response_model=ListOf, responses=errors(401))
def list_models(caller: CallerDep, session: SessionDep, settings: SettingsDep) -> ListOf:
    """The base backbones, then every version of your tasks as ft:<backbone>:<task>:<version>. A task's
    plain name ('sst2') is accepted as a model too and means its newest version."""
    data = [ModelObject(id=name, created=0, owned_by=BACKBONE_OWNER) for name in sorted(settings.backbones)]
    after = None
    while True:
        tasks, has_more = prompts.list_tasks(
            session, tenant_id=caller.tenant_id, limit=TASK_PAGE, after=after
        )
        for task in tasks:
            data += [
                ModelObject(
                    id=fine_tuned_model(v.base_model, task.name, v.version),
                    created=ids.unix(v.created_at),
                    owned_by=caller.tenant,
                )
                for v in task.versions
            ]
        if not has_more:
            return ListOf(data=data)
        after = tasks[-1].id


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
