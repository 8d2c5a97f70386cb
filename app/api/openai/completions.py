"""/v1/completions and /v1/chat/completions on the same engine as /v1/generate.

With a tuned model, a prompt (or the one user message of a chat) fills the task's template, exactly as
`input` does on /v1/generate; the task's template is its instruction, so a chat to a tuned model is one
user message. With the base backbone, a chat goes through the backbone's own chat template."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from app.api.auth import InferenceCallerDep
from app.api.deps import MetricsDep, ServingDep
from app.api.disconnect import unless_disconnected
from app.api.errors import error_body
from app.api.openai.params import neutral_only, speaking_as
from app.api.openai.schemas import NEUTRAL, ChatCompletionCreate, CompletionCreate, CompletionUsage, Sampling
from app.api.responses import errors
from app.config import Settings
from app.errors import DomainError, InvalidRequest
from app.ml.row import Generation, GenerationRequest
from app.services.serving import generation
from app.services.serving.serving import ResolvedTask, Serving

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
# The `object` of an answer, by (chat, chunk): a completion's stream chunks are text_completion objects too.
OBJECTS = {
    (True, False): "chat.completion",
    (True, True): "chat.completion.chunk",
    (False, False): "text_completion",
    (False, True): "text_completion",
}
STREAM = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or chunks with `stream: true`."}}


@router.post("/completions", responses={**STREAM, **errors(401, 404, 422, 429)})
async def create_completion(
    body: CompletionCreate,
    request: Request,
    caller: InferenceCallerDep,
    serving: ServingDep,
    metrics: MetricsDep,
):
    """Complete each prompt `n` times with a backbone or a tuned model."""
    if body.echo:
        raise InvalidRequest("echo is not supported by this service; omit it.", param="echo")
    sampling = _sampling(body, body.max_tokens, serving.settings)

    def prepare() -> tuple[ResolvedTask, list[GenerationRequest]]:
        """The database, the prompt's decoding and the tokenizer: off the event loop."""
        resolved = serving.resolve_model(tenant_id=caller.tenant_id, model=body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        with speaking_as({"input": "prompt"}):
            return resolved, generation.rows(serving, resolved, prompts, sampling, tenant_id=caller.tenant_id)

    resolved, requests = await run_in_threadpool(prepare)
    run = generation.start(
        serving, metrics, caller=caller, route="completions", resolved=resolved, requests=requests
    )
    return await _Answer(body, chat=False).send(request, run)


@router.post("/chat/completions", responses={**STREAM, **errors(401, 404, 422, 429)})
async def create_chat_completion(
    body: ChatCompletionCreate,
    request: Request,
    caller: InferenceCallerDep,
    serving: ServingDep,
    metrics: MetricsDep,
):
    """Answer a chat with a backbone (its chat template) or a tuned model (one user message)."""
    settings = serving.settings
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens
    sampling = _sampling(body, max_tokens, settings)

    def prepare() -> tuple[ResolvedTask, list[GenerationRequest]]:
        resolved = serving.resolve_model(tenant_id=caller.tenant_id, model=body.model)
        text = _chat_input(body, resolved, serving)
        with speaking_as({"input": "messages"}):
            return resolved, generation.rows(serving, resolved, [text], sampling, tenant_id=caller.tenant_id)

    resolved, requests = await run_in_threadpool(prepare)
    run = generation.start(
        serving, metrics, caller=caller, route="chat_completions", resolved=resolved, requests=requests
    )
    return await _Answer(body, chat=True).send(request, run)


def _sampling(body: Sampling, max_tokens: int, settings: Settings) -> generation.Sampling:
    """The request's decoding, its own bounds checked before any work."""
    neutral_only(body, NEUTRAL)
    sampling = generation.Sampling(
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
        seed=body.seed,
        n=body.n,
        tokens_param="max_tokens",
    )
    generation.check(settings, sampling)
    return sampling


def _chat_input(body: ChatCompletionCreate, resolved: ResolvedTask, serving: Serving) -> str:
    if resolved.task is not None:
        if len(body.messages) != 1 or body.messages[0].role != "user":
            raise InvalidRequest(
                f"model {body.model!r} is a tuned task: send exactly one user message; its text fills the "
                "task's template, which already holds the instruction.",
                param="messages",
            )
        return body.messages[0].text()
    if body.messages[-1].role != "user":
        raise InvalidRequest("The last message must be the user's.", param="messages")
    tokenizer = serving.require_backbone().tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(
            f"The backbone {body.model!r} has no chat template; use /v1/completions.",
            param="model",
            code="no_chat_template",
        )
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class _Answer:
    """A run's results in OpenAI's shapes: one JSON object, or a stream of chunks."""

    def __init__(self, body: Sampling, *, chat: bool):
        self.body, self.chat = body, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def send(self, request: Request, run: generation.GenerationRun):
        if self.body.stream:
            return EventSourceResponse(self._chunks(run))
        generations = await unless_disconnected(request, run.results(), run.cancel)
        return {
            **self._head(chunk=False),
            "choices": [self._choice(i, g) for i, g in enumerate(generations)],
            "usage": _usage(generations).model_dump(),
        }

    def _head(self, *, chunk: bool) -> dict[str, Any]:
        kind = OBJECTS[(self.chat, chunk)]
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model}

    def _choice(self, index: int, result: Generation) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": result.text, "refusal": None}
            return {
                "index": index,
                "message": message,
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        return {
            "index": index,
            "text": result.text,
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }

    def _delta(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {
                "index": index,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    async def _chunks(self, run: generation.GenerationRun) -> AsyncIterator[dict[str, str]]:
        """OpenAI's stream: `data: {chunk}` per piece of text, a last chunk per choice with its
        finish_reason, the usage if asked for, then `data: [DONE]`. A failure is a chunk holding `error`,
        which the SDK raises."""
        head = self._head(chunk=True)

        def emit(choices: list[dict]) -> dict[str, str]:
            return {"data": json.dumps({**head, "choices": choices})}

        if self.chat:
            yield emit(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(self.body.n)
                ]
            )
        try:
            async for update in run.updates():
                if update.text:
                    yield emit([self._delta(update.index, update.text, None)])
                if update.finished is not None:
                    yield emit([self._delta(update.index, "", update.finished.finish_reason)])
        except DomainError as error:
            yield {"data": json.dumps(error_body(error))}
            return
        options = self.body.stream_options
        if options is not None and options.include_usage:
            yield {"data": json.dumps({**head, "choices": [], "usage": _usage(run.generations).model_dump()})}
        yield {"data": "[DONE]"}


def _usage(generations: list[Generation]) -> CompletionUsage:
    prompt = sum(g.input_tokens for g in generations)
    completion = sum(g.tokens for g in generations)
    return CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
