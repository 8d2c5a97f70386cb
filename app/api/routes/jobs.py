from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated

import anyio
import anyio.from_thread
from fastapi import APIRouter, Header, Request, Response
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from app.api.auth import BearerDep, CallerDep
from app.api.deps import AfterQuery, IdPath, LimitQuery, MetadataFilter, SessionDep, SettingsDep
from app.api.errors import error_body
from app.api.responses import errors
from app.contract.kinds import FINISHED_STATUSES
from app.contract.schemas import JobCreate, JobEventPublic, JobPublic, Page
from app.db.session import session_scope
from app.errors import DomainError
from app.services.tuning import jobs as service

router = APIRouter(prefix="/v1/tuning/jobs", tags=["tuning jobs"])
EVENT_POLL_S = 0.5
# How long an event stream gets to say goodbye when the server stops; well inside uvicorn's wait.
SHUTDOWN_GRACE_S = 2.0


@router.post("", status_code=201, response_model=JobPublic, responses=errors(401, 404, 409, 422, 429))
def create_job(
    body: JobCreate,
    response: Response,
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobPublic:
    """Queue a tuning job; a repeated Idempotency-Key returns the job the first request made."""
    request = service.JobRequest(
        task=body.task,
        training_dataset=body.training_dataset,
        validation_dataset=body.validation_dataset,
        base_model=body.base_model,
        method=body.method,
        num_virtual_tokens=body.num_virtual_tokens,
        template=body.template,
        init=body.init.stored() if body.init else None,
        hyperparameters=body.hyperparameters,
        metadata=body.metadata,
    )
    job, created = service.submit_job(
        session, caller=caller, request=request, settings=settings, idempotency_key=idempotency_key
    )
    if not created:
        response.status_code = 200
    return JobPublic.of(job)


@router.get("", response_model=Page[JobPublic], responses=errors(401, 422))
def list_jobs(
    caller: CallerDep,
    session: SessionDep,
    metadata: MetadataFilter,
    limit: LimitQuery = 20,
    after: AfterQuery = None,
) -> Page[JobPublic]:
    """List your tuning jobs, newest first; `?metadata[key]=value` (each key once) keeps those whose
    metadata holds every such pair."""
    rows, has_more = service.list_jobs(
        session, tenant_id=caller.tenant_id, limit=limit, after=after, metadata=metadata
    )
    return Page[JobPublic](data=[JobPublic.of(r) for r in rows], has_more=has_more)


@router.get("/{job_id}", response_model=JobPublic, responses=errors(401, 404))
def get_job(job_id: IdPath, caller: CallerDep, session: SessionDep) -> JobPublic:
    """Get a job's status, progress, metrics and result."""
    return JobPublic.of(service.get_job(session, tenant_id=caller.tenant_id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=errors(401, 404, 409))
def cancel_job(job_id: IdPath, caller: CallerDep, session: SessionDep) -> JobPublic:
    """Cancel a queued job (it never starts) or a running one (it stops at the next step, writing nothing)."""
    job = service.cancel_job(session, tenant_id=caller.tenant_id, job_id=job_id)
    return JobPublic.of(job)


@router.get(
    "/{job_id}/events",
    response_model=list[JobEventPublic],
    responses={
        **errors(401, 404),
        200: {
            "content": {"text/event-stream": {}},
            "description": "JSON list, or a live stream with Accept: text/event-stream.",
        },
    },
)
def job_events(
    job_id: IdPath,
    request: Request,
    caller: CallerDep,
    credentials: BearerDep,
    session: SessionDep,
    settings: SettingsDep,
    after: AfterQuery = None,
):
    """The job's events; with `Accept: text/event-stream`, a live stream that ends when the job does."""
    events = service.list_events(session, tenant_id=caller.tenant_id, job_id=job_id, after=after)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return [_event(e) for e in events]
    # This handler runs in a worker thread; the shutdown event belongs to the server's event loop.
    shutdown = anyio.from_thread.run_sync(anyio.Event)
    authenticator = request.app.state.authenticator
    release = request.app.state.stream_slots.acquire(caller.tenant_id)  # 429 past the caps

    def recheck() -> None:
        """A stream outlives its request: a key revoked meanwhile (or a first key ending the open mode)
        ends it at the next poll, not when the job does."""
        authenticator.authenticate(request, credentials)

    stream = _stream(settings.registry_url, caller.tenant_id, job_id, after, request, shutdown, recheck)
    return EventSourceResponse(
        _releasing(stream, release),
        shutdown_event=shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE_S,
        background=BackgroundTask(release),  # also when the stream never started
    )


async def _releasing(stream: AsyncIterator[dict], release: Callable[[], None]) -> AsyncIterator[dict]:
    """The stream's events; its slot is free again as soon as it ends, however it ends."""
    try:
        async for event in stream:
            yield event
    finally:
        release()


def _event(row) -> JobEventPublic:
    return JobEventPublic(
        id=row.id, type=row.type, message=row.message, data=row.data, created_at=row.created_at
    )


async def _stream(
    db_url: str,
    tenant_id: int,
    job_id: int,
    after: int | None,
    request: Request,
    shutdown: anyio.Event,
    recheck: Callable[[], None],
):
    last = after
    while True:
        if shutdown.is_set():
            # The server is stopping: say so and end the response cleanly, so a client knows to reconnect
            # (to another replica, or this one once it is back) with `after` and loses no event.
            yield {"event": "shutdown", "data": json.dumps({"after": last})}
            return
        try:
            await asyncio.to_thread(recheck)
        except DomainError as error:
            yield {"event": "error", "data": json.dumps(error_body(error))}
            return
        events, status = await asyncio.to_thread(_poll, db_url, tenant_id, job_id, last)
        for event in events:
            last = event.id
            yield {
                "id": str(event.id),
                "event": event.type,
                "data": json.dumps(event.model_dump(mode="json")),
            }
        if status in FINISHED_STATUSES and not events:
            yield {"event": "end", "data": json.dumps({"status": status})}
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_S)


def _poll(db_url: str, tenant_id: int, job_id: int, after: int | None) -> tuple[list[JobEventPublic], str]:
    with session_scope(db_url) as session:
        owned = {"tenant_id": tenant_id, "job_id": job_id}
        events = [_event(e) for e in service.list_events(session, **owned, after=after)]
        return events, service.get_job(session, **owned).status
