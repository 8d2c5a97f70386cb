"""/v1/files: uploads with purpose fine-tune are datasets, parsed and checked whole before they are stored."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Header, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.auth import CallerDep
from app.api.deps import LimitQuery, ServingDep, SessionDep, SettingsDep
from app.api.openai import ids
from app.api.openai.schemas import Deleted, FileObject, ListOf
from app.api.responses import errors
from app.db.models import Dataset
from app.services.datasets import datasets as service

router = APIRouter(prefix="/v1/files", tags=["OpenAI-compatible"])


def file_object(row: Dataset) -> FileObject:
    return FileObject(
        id=ids.to_id(ids.FILE, row.id),
        bytes=row.size_bytes,
        created_at=int(row.created_at.timestamp()),
        filename=row.filename,
    )


@router.post("", response_model=FileObject, responses=errors(401, 409, 413, 415, 422, 429))
async def create_file(
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    serving: ServingDep,
    file: Annotated[UploadFile, File(description=".jsonl or .csv, as for POST /v1/datasets.")],
    purpose: Annotated[Literal["fine-tune"], Form(description="Only fine-tune.")],
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> FileObject:
    """Upload a fine-tuning file (the OpenAI shape of POST /v1/datasets)."""
    dataset, _ = await run_in_threadpool(
        service.store_upload,
        session,
        caller=caller,
        settings=settings,
        stream=file.file,
        filename=file.filename or "",
        name=None,
        count_tokens=serving.count_tokens if serving.ready else None,
        idempotency_key=idempotency_key,
    )
    return file_object(dataset)


@router.get("", response_model=ListOf, responses=errors(401, 404, 422))
def list_files(
    caller: CallerDep,
    session: SessionDep,
    limit: LimitQuery = 20,
    after: str | None = None,
    purpose: Literal["fine-tune"] | None = None,
) -> ListOf:
    """List your files, newest first."""
    rows, has_more = service.list_datasets(
        session, tenant_id=caller.tenant_id, limit=limit, after=ids.cursor(ids.FILE, after)
    )
    return ListOf(data=[file_object(r) for r in rows], has_more=has_more)


@router.get("/{file_id}", response_model=FileObject, responses=errors(401, 404))
def retrieve_file(file_id: str, caller: CallerDep, session: SessionDep) -> FileObject:
    """Get one file."""
    number = ids.from_id(ids.FILE, file_id, what="file", param="file_id")
    return file_object(service.get_dataset(session, tenant_id=caller.tenant_id, dataset_id=number))


@router.delete("/{file_id}", response_model=Deleted, responses=errors(401, 404, 409))
def delete_file(file_id: str, caller: CallerDep, session: SessionDep) -> Deleted:
    """Delete a file; refused while a queued or running job uses it."""
    number = ids.from_id(ids.FILE, file_id, what="file", param="file_id")
    service.delete_dataset(session, tenant_id=caller.tenant_id, dataset_id=number)
    return Deleted(id=file_id, object="file")
