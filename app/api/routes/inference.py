from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from app.api.auth import InferenceCallerDep
from app.api.deps import MetricsDep, ServingDep, SessionDep, SettingsDep
from app.api.errors import error_body
from app.api.responses import errors
from app.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    GenerateRequest,
    GenerateResponse,
    GenerationOut,
    Usage,
)
from app.errors import DomainError, InvalidRequest
from app.ml.sequence import Generation
from app.services.serving import GenerationHandle, ResolvedPrompt

router = APIRouter(prefix="/v1", tags=["inference"])


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


STREAM_RESPONSE = {
    200: {
        "description": "JSON, or with `stream: true` server-sent events: `token`, then `output` and `done` "
        "per input, or `error`.",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": "One server-sent event; `data` is a JSON object.",
                    "properties": {
                        "event": {"enum": ["token", "output", "done", "error"]},
                        "data": {"type": "string"},
                    },
                    "required": ["event", "data"],
                }
            }
        },
    }
}


@router.post(
    "/generate", response_model=GenerateResponse, responses={**STREAM_RESPONSE, **errors(401, 404, 422, 429)}
)
async def generate(
    body: GenerateRequest,
    caller: InferenceCallerDep,
    session: SessionDep,
    settings: SettingsDep,
    serving: ServingDep,
    metrics: MetricsDep,
):
    """Generate text with a task's prompt (or the bare backbone); `stream: true` sends tokens as they come."""
    if body.max_new_tokens > settings.max_new_tokens:
        raise InvalidRequest(
            f"max_new_tokens is {body.max_new_tokens}; the limit is {settings.max_new_tokens}.",
            param="max_new_tokens",
        )
    if body.stop and any(not s for s in body.stop):
        raise InvalidRequest("stop strings must not be empty.", param="stop")
    resolved = serving.resolve(session, tenant_id=caller.tenant_id, ref=body.task)
    texts, _ = serving.render_inputs(resolved, _as_list(body.input))
    session.close()  # nothing more to read; don't hold a connection while the model runs
    requests = serving.generation_requests(
        resolved,
        texts,
        tenant_id=caller.tenant_id,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        seed=body.seed,
    )
    handle = serving.start_generation(requests)  # a full queue answers 429 here, before any byte is sent

    def served(generations: list[Generation]) -> None:
        tokens = sum(g.tokens for g in generations)
        metrics.served(
            tenant=caller.tenant, task=resolved.task, route="generate", inputs=len(texts), tokens=tokens
        )

    if body.stream:
        return EventSourceResponse(_stream(handle, resolved, served))
    generations = await handle.results()
    served(generations)
    return _response(resolved, generations)


def _response(resolved: ResolvedPrompt, generations: list[Generation]) -> GenerateResponse:
    return GenerateResponse(
        task=resolved.task,
        version=resolved.version,
        outputs=[
            GenerationOut(text=g.text, finish_reason=g.finish_reason, tokens=g.tokens) for g in generations
        ],
        usage=Usage(
            prompt_tokens=sum(g.prompt_tokens for g in generations),
            completion_tokens=sum(g.tokens for g in generations),
        ),
    )


async def _stream(
    handle: GenerationHandle, resolved: ResolvedPrompt, served: Callable[[list[Generation]], None]
):
    """`token` events as text becomes final, `output` when an input is done, `done` with the whole
    response last; a failure ends the stream with an `error` event carrying the usual error body."""
    results: dict[int, Generation] = {}
    try:
        async for update in handle.updates():
            if update.text:
                yield {"event": "token", "data": json.dumps({"index": update.index, "text": update.text})}
            if update.finished is not None:
                results[update.index] = update.finished
                output = GenerationOut(
                    text=update.finished.text,
                    finish_reason=update.finished.finish_reason,
                    tokens=update.finished.tokens,
                )
                yield {"event": "output", "data": json.dumps({"index": update.index, **output.model_dump()})}
    except DomainError as error:
        yield {"event": "error", "data": json.dumps(error_body(error))}
        return
    generations = [results[i] for i in sorted(results)]
    served(generations)
    yield {"event": "done", "data": _response(resolved, generations).model_dump_json()}


@router.post("/classify", response_model=ClassifyResponse, responses=errors(401, 404, 422, 429))
async def classify(
    body: ClassifyRequest,
    caller: InferenceCallerDep,
    session: SessionDep,
    serving: ServingDep,
    metrics: MetricsDep,
) -> ClassifyResponse:
    """Score each candidate label by its likelihood after the input; returns probabilities over labels."""
    resolved = serving.resolve(session, tenant_id=caller.tenant_id, ref=body.task)
    labels = body.labels or resolved.labels
    if not labels:
        raise InvalidRequest("This task has no label set; pass labels.", param="labels")
    if len(set(labels)) != len(labels) or any(not label.strip() for label in labels):
        raise InvalidRequest("labels must be distinct, non-empty strings.", param="labels")
    texts, token_counts = serving.render_inputs(resolved, _as_list(body.input))
    session.close()
    scores = await serving.classify(resolved, texts, labels, tenant_id=caller.tenant_id)
    metrics.served(tenant=caller.tenant, task=resolved.task, route="classify", inputs=len(texts), tokens=0)
    return ClassifyResponse(
        task=resolved.task,
        version=resolved.version,
        results=[ClassifyResult(label=max(s, key=s.get), scores=s) for s in scores],
        usage=Usage(prompt_tokens=sum(token_counts), completion_tokens=0),
    )
