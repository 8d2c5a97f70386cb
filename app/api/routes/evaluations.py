from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from app.api.auth import CallerDep
from app.api.deps import AfterQuery, IdPath, LimitQuery, MetadataFilter, SessionDep, SettingsDep
from app.api.responses import errors
from app.contract.schemas import EvaluationCreate, EvaluationPublic, Page
from app.services.evaluation import evaluations as service

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"])


@router.post("", status_code=201, response_model=EvaluationPublic, responses=errors(401, 404, 409, 422, 429))
def create_evaluation(
    body: EvaluationCreate,
    response: Response,
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> EvaluationPublic:
    """Queue an evaluation: score a dataset with several models (versions, or null for the bare backbone)
    and compare their metrics. A repeated Idempotency-Key returns the evaluation the first request made."""
    request = service.EvaluationRequest(
        dataset=body.dataset,
        models=body.models,
        template=body.template,
        max_new_tokens=body.max_new_tokens,
        metadata=body.metadata,
    )
    evaluation, created = service.submit_evaluation(
        session, caller=caller, request=request, settings=settings, idempotency_key=idempotency_key
    )
    if not created:
        response.status_code = 200
    return EvaluationPublic.of(evaluation)


@router.get("", response_model=Page[EvaluationPublic], responses=errors(401, 422))
def list_evaluations(
    caller: CallerDep,
    session: SessionDep,
    metadata: MetadataFilter,
    limit: LimitQuery = 20,
    after: AfterQuery = None,
    task: Annotated[str | None, Query(max_length=64, description="Only those including this task.")] = None,
) -> Page[EvaluationPublic]:
    """List your evaluations, newest first; with task, those that include one of its versions;
    `?metadata[key]=value` (each key once) keeps those whose metadata holds every such pair."""
    rows, has_more = service.list_evaluations(
        session, tenant_id=caller.tenant_id, limit=limit, after=after, task=task, metadata=metadata
    )
    return Page[EvaluationPublic](data=[EvaluationPublic.of(r) for r in rows], has_more=has_more)


@router.get("/{evaluation_id}", response_model=EvaluationPublic, responses=errors(401, 404))
def get_evaluation(evaluation_id: IdPath, caller: CallerDep, session: SessionDep) -> EvaluationPublic:
    """Get an evaluation's status, progress and, once it succeeded, each model's metrics."""
    found = service.get_evaluation(session, tenant_id=caller.tenant_id, evaluation_id=evaluation_id)
    return EvaluationPublic.of(found)


@router.post("/{evaluation_id}/cancel", response_model=EvaluationPublic, responses=errors(401, 404, 409))
def cancel_evaluation(evaluation_id: IdPath, caller: CallerDep, session: SessionDep) -> EvaluationPublic:
    """Cancel a queued evaluation (it never starts) or a running one (it stops after its current rows)."""
    found = service.cancel_evaluation(session, tenant_id=caller.tenant_id, evaluation_id=evaluation_id)
    return EvaluationPublic.of(found)


@router.get(
    "/{evaluation_id}/predictions",
    response_class=Response,
    responses={200: {"content": {"application/x-ndjson": {}}}, **errors(401, 404, 409)},
)
def download_predictions(evaluation_id: IdPath, caller: CallerDep, session: SessionDep) -> Response:
    """Per-example predictions of a finished evaluation, one JSON line per dataset row: the row's input,
    what was expected, and each model's output with its scores."""
    data = service.predictions(session, tenant_id=caller.tenant_id, evaluation_id=evaluation_id)
    return Response(
        data,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="evaluation-{evaluation_id}.jsonl"'},
    )
