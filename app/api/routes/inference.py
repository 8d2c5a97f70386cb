from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from app.api.auth import InferenceCallerDep
from app.api.deps import MetricsDep, ServingDep
from app.api.disconnect import unless_disconnected
from app.api.errors import error_body
from app.api.responses import errors
from app.contract.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    GenerateRequest,
    GenerateResponse,
    GenerationOut,
    Usage,
)
from app.errors import DomainError
from app.ml.row import GenerationRequest
from app.services.serving import generation
from app.services.serving.serving import ResolvedTask

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
    request: Request,
    caller: InferenceCallerDep,
    serving: ServingDep,
    metrics: MetricsDep,
):
    """Generate text with a task's prompt (or the bare backbone); `stream: true` sends tokens as they come."""
    sampling = generation.Sampling(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop or [],
        seed=body.seed,
    )
    generation.check(serving.settings, sampling)

    def prepare() -> tuple[ResolvedTask, list[GenerationRequest]]:
        """The database, the prompt's decoding and the tokenizer: off the event loop."""
        resolved = serving.resolve_task(tenant_id=caller.tenant_id, ref=body.task)
        return resolved, generation.rows(
            serving, resolved, _as_list(body.input), sampling, tenant_id=caller.tenant_id
        )

    resolved, requests = await run_in_threadpool(prepare)
    run = generation.start(
        serving, metrics, caller=caller, route="generate", resolved=resolved, requests=requests
    )
    if body.stream:
        return EventSourceResponse(_stream(run))
    await unless_disconnected(request, run.results(), run.cancel)
    return _response(run)


def _response(run: generation.GenerationRun) -> GenerateResponse:
    generations = run.generations
    return GenerateResponse(
        task=run.resolved.task,
        version=run.resolved.version,
        outputs=[
            GenerationOut(text=g.text, finish_reason=g.finish_reason, tokens=g.tokens) for g in generations
        ],
        usage=Usage(
            prompt_tokens=sum(g.input_tokens for g in generations),
            completion_tokens=sum(g.tokens for g in generations),
        ),
    )


async def _stream(run: generation.GenerationRun):
    """`token` events as text becomes final, `output` when an input is done, `done` with the whole
    response last; a failure ends the stream with an `error` event carrying the usual error body."""
    try:
        async for update in run.updates():
            if update.text:
                yield {"event": "token", "data": json.dumps({"index": update.index, "text": update.text})}
            if update.finished is not None:
                output = GenerationOut(
                    text=update.finished.text,
                    finish_reason=update.finished.finish_reason,
                    tokens=update.finished.tokens,
                )
                yield {"event": "output", "data": json.dumps({"index": update.index, **output.model_dump()})}
    except DomainError as error:
        yield {"event": "error", "data": json.dumps(error_body(error))}
        return
    yield {"event": "done", "data": _response(run).model_dump_json()}


@router.post("/classify", response_model=ClassifyResponse, responses=errors(401, 404, 422, 429))
async def classify(
    body: ClassifyRequest,
    request: Request,
    caller: InferenceCallerDep,
    serving: ServingDep,
    metrics: MetricsDep,
) -> ClassifyResponse:
    """Score each candidate label by its likelihood after the input; returns probabilities over labels."""

    def prepare() -> tuple[ResolvedTask, list[str], list[str], list[int]]:
        resolved = serving.resolve_task(tenant_id=caller.tenant_id, ref=body.task)
        texts, token_counts = serving.render_inputs(resolved, _as_list(body.input))
        labels = serving.classification_labels(resolved, body.labels, len(texts))
        return resolved, labels, texts, token_counts

    resolved, labels, texts, token_counts = await run_in_threadpool(prepare)
    call = serving.start_classification(resolved, texts, labels, tenant_id=caller.tenant_id)
    scores = await unless_disconnected(request, asyncio.wrap_future(call), call.abandon)
    metrics.served(tenant=caller.tenant, task=resolved.task, route="classify", inputs=len(texts), tokens=0)
    return ClassifyResponse(
        task=resolved.task,
        version=resolved.version,
        results=[ClassifyResult(label=max(s, key=s.get), scores=s) for s in scores],
        usage=Usage(prompt_tokens=sum(token_counts), completion_tokens=0),
    )
