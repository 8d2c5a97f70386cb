from __future__ import annotations

import json
from functools import partial

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from app.api.deps import ServingDep, SessionDep, SettingsDep
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
from app.errors import InvalidRequest
from app.services import serving as service

router = APIRouter(prefix="/v1", tags=["inference"])


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


@router.post("/generate", response_model=GenerateResponse, responses=errors(404, 422, 429))
async def generate(body: GenerateRequest, session: SessionDep, settings: SettingsDep, serving: ServingDep):
    """Generate text with a task's prompt (or the bare backbone); a list of inputs runs as one batch."""
    if body.max_new_tokens > settings.max_new_tokens:
        raise InvalidRequest(
            f"max_new_tokens is {body.max_new_tokens}; the limit is {settings.max_new_tokens}.",
            param="max_new_tokens",
        )
    if body.stop and any(not s for s in body.stop):
        raise InvalidRequest("stop strings must not be empty.", param="stop")
    resolved = serving.resolve(session, body.task)
    texts, _ = serving.render_inputs(resolved, _as_list(body.input))
    session.close()  # nothing more to read; don't hold a connection while the model runs
    work = partial(
        service.generate,
        prompt=resolved.prompt,
        texts=texts,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        seed=body.seed,
    )
    generations = await serving.run(work)
    response = GenerateResponse(
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
    if not body.stream:
        return response
    return EventSourceResponse(_stream_outputs(response))


async def _stream_outputs(response: GenerateResponse):
    # Each output is sent as one event once the batch is done; token-by-token streaming needs the
    # iteration-level scheduler and arrives with it.
    for index, output in enumerate(response.outputs):
        yield {"event": "output", "data": json.dumps({"index": index, **output.model_dump()})}
    yield {"event": "done", "data": response.model_dump_json()}


@router.post("/classify", response_model=ClassifyResponse, responses=errors(404, 422, 429))
async def classify(body: ClassifyRequest, session: SessionDep, serving: ServingDep) -> ClassifyResponse:
    """Score each candidate label by its likelihood after the input; returns probabilities over labels."""
    resolved = serving.resolve(session, body.task)
    labels = body.labels or resolved.labels
    if not labels:
        raise InvalidRequest("This task has no label set; pass labels.", param="labels")
    if len(set(labels)) != len(labels) or any(not label.strip() for label in labels):
        raise InvalidRequest("labels must be distinct, non-empty strings.", param="labels")
    texts, token_counts = serving.render_inputs(resolved, _as_list(body.input))
    session.close()
    scores = await serving.run(partial(service.classify, prompt=resolved.prompt, texts=texts, labels=labels))
    return ClassifyResponse(
        task=resolved.task,
        version=resolved.version,
        results=[ClassifyResult(label=max(s, key=s.get), scores=s) for s in scores],
        usage=Usage(prompt_tokens=sum(token_counts), completion_tokens=0),
    )
