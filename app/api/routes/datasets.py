from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.auth import CallerDep
from app.api.deps import AfterQuery, IdPath, LimitQuery, ServingDep, SessionDep, SettingsDep
from app.api.responses import errors
from app.contract.schemas import DatasetPublic, Page
from app.db.models import NAME_CHARS
from app.services.datasets import datasets as service

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post(
    "", status_code=201, response_model=DatasetPublic, responses=errors(401, 409, 413, 415, 422, 429)
)
async def upload_dataset(
    request: Request,
    response: Response,
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    serving: ServingDep,
    file: Annotated[
        UploadFile,
        File(
            description=".jsonl or .csv: {text,label}, {input,output} or {prompt,completion} records; "
            "or .jsonl {input,references: [...]} records, a test set for evaluations."
        ),
    ],
    name: Annotated[str | None, Form(max_length=NAME_CHARS)] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> DatasetPublic:
    """Upload a labeled dataset; it is validated whole before anything is stored. A repeated
    Idempotency-Key with the same file and name returns the dataset the first upload made (200)."""
    dataset, created = await run_in_threadpool(
        service.store_upload,
        session,
        caller=caller,
        settings=settings,
        stream=file.file,
        filename=file.filename or "",
        name=name,
        count_tokens=serving.count_tokens if serving.ready else None,
        idempotency_key=idempotency_key,
    )
    if not created:
        response.status_code = 200
    return DatasetPublic.model_validate(dataset)


@router.get("", response_model=Page[DatasetPublic], responses=errors(401, 422))
def list_datasets(
    caller: CallerDep, session: SessionDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> Page[DatasetPublic]:
    """List your datasets, newest first."""
    rows, has_more = service.list_datasets(session, tenant_id=caller.tenant_id, limit=limit, after=after)
    return Page[DatasetPublic](data=[DatasetPublic.model_validate(r) for r in rows], has_more=has_more)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=errors(401, 404))
def get_dataset(dataset_id: IdPath, caller: CallerDep, session: SessionDep) -> DatasetPublic:
    """Get one dataset's description and statistics."""
    found = service.get_dataset(session, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    return DatasetPublic.model_validate(found)


@router.delete("/{dataset_id}", status_code=204, responses=errors(401, 404, 409))
def delete_dataset(dataset_id: IdPath, caller: CallerDep, session: SessionDep) -> Response:
    """Delete a dataset; refused while a queued or running job or evaluation uses it."""
    service.delete_dataset(session, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    return Response(status_code=204)
