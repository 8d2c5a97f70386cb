from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Request, Response, UploadFile
from sqlalchemy.orm import Session

from app.api.auth import CallerDep
from app.api.deps import AfterQuery, IdPath, LimitQuery, ServingDep, SessionDep, SettingsDep
from app.api.responses import errors
from app.api.schemas import DatasetPublic, Page
from app.config import Settings
from app.db.models import Dataset
from app.errors import PayloadTooLarge
from app.services import datasets as service
from app.services.serving import Serving
from app.services.tenants import Caller

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
READ_CHUNK = 1024 * 1024


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
        File(description=".jsonl or .csv: {text,label}, {input,output} or {prompt,completion} records."),
    ],
    name: Annotated[str | None, Form(max_length=200)] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> DatasetPublic:
    """Upload a labeled dataset; it is validated whole before anything is stored. A repeated
    Idempotency-Key with the same file and name returns the dataset the first upload made (200)."""
    dataset, created = await store_upload(
        session,
        caller=caller,
        settings=settings,
        serving=serving,
        file=file,
        name=name,
        idempotency_key=idempotency_key,
    )
    if not created:
        response.status_code = 200
    return DatasetPublic.of(dataset)


async def store_upload(
    session: Session,
    *,
    caller: Caller,
    settings: Settings,
    serving: Serving,
    file: UploadFile,
    name: str | None,
    idempotency_key: str | None,
) -> tuple[Dataset, bool]:
    """The upload read within its limit, parsed, stored and committed; shared with POST /v1/files."""
    dataset, created = service.create_dataset(
        session,
        caller=caller,
        data=await _read_limited(file, settings.max_upload_bytes),
        filename=file.filename or "",
        name=name,
        min_examples=settings.min_examples,
        max_examples=settings.max_examples,
        count_tokens=_token_counter(serving),
        idempotency_key=idempotency_key,
    )
    session.commit()
    return dataset, created


def _token_counter(serving: Serving) -> Callable[[str], int] | None:
    """Counts tokens for the dataset's statistics, when this process has the backbone loaded."""
    tokenizer = serving.backbone.tokenizer if serving.backbone is not None else None
    if tokenizer is None:
        return None
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


async def _read_limited(file: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await file.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"The file is larger than the upload limit of {limit} bytes.",
                param="file",
                code="file_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


@router.get("", response_model=Page[DatasetPublic], responses=errors(401, 422))
def list_datasets(
    caller: CallerDep, session: SessionDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> Page[DatasetPublic]:
    """List your datasets, newest first."""
    rows, has_more = service.list_datasets(session, tenant_id=caller.tenant_id, limit=limit, after=after)
    return Page[DatasetPublic](data=[DatasetPublic.of(r) for r in rows], has_more=has_more)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=errors(401, 404))
def get_dataset(dataset_id: IdPath, caller: CallerDep, session: SessionDep) -> DatasetPublic:
    """Get one dataset's description and statistics."""
    return DatasetPublic.of(service.get_dataset(session, tenant_id=caller.tenant_id, dataset_id=dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=errors(401, 404, 409))
def delete_dataset(dataset_id: IdPath, caller: CallerDep, session: SessionDep) -> Response:
    """Delete a dataset; refused while a queued or running job uses it."""
    service.delete_dataset(session, tenant_id=caller.tenant_id, dataset_id=dataset_id)
    session.commit()
    return Response(status_code=204)
