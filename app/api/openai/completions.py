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
from app.api.deps import MetricsDep, ServingDep, SessionDep, SettingsDep
from app.api.disconnect import unless_disconnected
from app.api.errors import error_body
from app.api.openai.models import resolve_model
from app.api.openai.params import neutral_only, speaking_as
from app.api.openai.schemas import NEUTRAL, ChatCompletionCreate, CompletionCreate, CompletionUsage, Sampling
from app.api.responses import errors
from app.errors import DomainError, InvalidRequest
from app.ml.sequence import Generation, GenerationRequest
from app.services.metrics import Metrics
from app.services.serving import ResolvedPrompt, Serving
from app.services.tenants import Caller

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
STREAM = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or chunks with `stream: true`."}}


@router.post("/completions", responses={**STREAM, **errors(401, 404, 422, 429)})
async def create_completion(
    body: CompletionCreate,
    request: Request,
    caller: InferenceCallerDep,
    session: SessionDep,
    serving: ServingDep,
    metrics: MetricsDep,
):
    """Complete each prompt `n` times with a backbone or a tuned model."""
    if body.echo:
        raise InvalidRequest("echo is not supported by this service; omit it.", param="echo")
    run = _Run(body, caller, serving, metrics, body.max_tokens, "completion")

    def prepare() -> list[GenerationRequest]:
        """The database, the prompt's decoding and the tokenizer: off the event loop."""
        resolved = resolve_model(session, serving, caller, body.model)
        session.close()  # nothing more to read; don't hold a connection while the model runs
        return run.requests(resolved, [body.prompt] if isinstance(body.prompt, str) else body.prompt)

    requests = await run_in_threadpool(prepare)
    return await run.respond(request, requests)


@router.post("/chat/completions", responses={**STREAM, **errors(401, 404, 422, 429)})
async def create_chat_completion(
    body: ChatCompletionCreate,
    request: Request,
    caller: InferenceCallerDep,
    session: SessionDep,
    settings: SettingsDep,
    serving: ServingDep,
    metrics: MetricsDep,
):
    """Answer a chat with a backbone (its chat template) or a tuned model (one user message)."""
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens
    run = _Run(body, caller, serving, metrics, max_tokens, "chat")

    def prepare() -> list[GenerationRequest]:
        resolved = resolve_model(session, serving, caller, body.model)
        session.close()
        return run.requests(resolved, [_chat_input(body, resolved, serving)])

    requests = await run_in_threadpool(prepare)
    return await run.respond(request, requests)


def _chat_input(body: ChatCompletionCreate, resolved: ResolvedPrompt, serving: Serving) -> str:
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


class _Run:
    """One request's generations, as a JSON response or a stream of OpenAI chunks. Its own bounds are
    checked when it is made, before any work."""

    def __init__(
        self, body: Sampling, caller: Caller, serving: Serving, metrics: Metrics, max_tokens: int, kind: str
    ):
        neutral_only(body, NEUTRAL)
        self.stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        serving.check_generation(max_new_tokens=max_tokens, stop=self.stop, tokens_param="max_tokens")
        self.body, self.kind, self.caller, self.serving, self.metrics = body, kind, caller, serving, metrics
        self.max_tokens = max_tokens
        self.resolved: ResolvedPrompt | None = None
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def requests(self, resolved: ResolvedPrompt, inputs: list[str]) -> list[GenerationRequest]:
        """Each input rendered, tokenised and repeated n times; blocking, so called off the event loop."""
        self.resolved = resolved
        limit = self.serving.settings.max_batch_inputs
        if len(inputs) * self.body.n > limit:
            raise InvalidRequest(
                f"{len(inputs)} prompts with n={self.body.n} make {len(inputs) * self.body.n} completions; "
                f"the limit is {limit} per request.",
                param="n",
            )
        with speaking_as({"input": "messages" if self.kind == "chat" else "prompt"}):
            texts, _ = self.serving.render_inputs(resolved, inputs)
        # Each input n times, adjacent: choice i is input i // n. Row j samples with seed + j, so the n
        # choices differ even with a seed.
        texts = [text for text in texts for _ in range(self.body.n)]
        return self.serving.generation_requests(
            resolved,
            texts,
            tenant_id=self.caller.tenant_id,
            max_new_tokens=self.max_tokens,
            temperature=self.body.temperature,
            top_p=self.body.top_p,
            stop=self.stop,
            seed=self.body.seed,
        )

    async def respond(self, request: Request, requests: list[GenerationRequest]):
        self.handle = self.serving.start_generation(requests)  # a full queue answers 429 here, at once
        if self.body.stream:
            return EventSourceResponse(self._chunks())
        generations = await unless_disconnected(request, self.handle.results(), self.handle.cancel)
        self._served(generations)
        return {
            **self._head(self.kind),
            "choices": [self._choice(i, g) for i, g in enumerate(generations)],
            "usage": _usage(generations).model_dump(),
        }

    def _served(self, generations: list[Generation]) -> None:
        self.metrics.served(
            tenant=self.caller.tenant,
            task=self.resolved.task,
            route="chat_completions" if self.kind == "chat" else "completions",
            inputs=len(generations),
            tokens=sum(g.tokens for g in generations),
        )

    def _head(self, object_kind: str) -> dict[str, Any]:
        objects = {
            "chat": "chat.completion",
            "chunk": "chat.completion.chunk",
            "completion": "text_completion",
        }
        return {
            "id": self.id,
            "object": objects[object_kind],
            "created": self.created,
            "model": self.body.model,
        }

    def _choice(self, index: int, generation: Generation) -> dict[str, Any]:
        if self.kind == "chat":
            message = {"role": "assistant", "content": generation.text, "refusal": None}
            return {
                "index": index,
                "message": message,
                "logprobs": None,
                "finish_reason": generation.finish_reason,
            }
        return {
            "index": index,
            "text": generation.text,
            "logprobs": None,
            "finish_reason": generation.finish_reason,
        }

    def _delta(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            return {
                "index": index,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    async def _chunks(self) -> AsyncIterator[dict[str, str]]:
        """OpenAI's stream: `data: {chunk}` per piece of text, a last chunk per choice with its
        finish_reason, the usage if asked for, then `data: [DONE]`. A failure is a chunk holding `error`,
        which the SDK raises."""
        head = self._head("chunk" if self.kind == "chat" else "completion")

        def emit(choices: list[dict]) -> dict[str, str]:
            return {"data": json.dumps({**head, "choices": choices})}

        results: dict[int, Generation] = {}
        if self.kind == "chat":
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
            async for update in self.handle.updates():
                if update.text:
                    yield emit([self._delta(update.index, update.text, None)])
                if update.finished is not None:
                    results[update.index] = update.finished
                    yield emit([self._delta(update.index, "", update.finished.finish_reason)])
        except DomainError as error:
            yield {"data": json.dumps(error_body(error))}
            return
        generations = [results[i] for i in sorted(results)]
        self._served(generations)
        options = self.body.stream_options
        if options is not None and options.include_usage:
            yield {"data": json.dumps({**head, "choices": [], "usage": _usage(generations).model_dump()})}
        yield {"data": "[DONE]"}


def _usage(generations: list[Generation]) -> CompletionUsage:
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(g.tokens for g in generations)
    return CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
