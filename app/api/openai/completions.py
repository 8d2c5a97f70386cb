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

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from app.api.auth import InferenceCallerDep
from app.api.deps import MetricsDep, ServingDep, SessionDep, SettingsDep
from app.api.errors import error_body
from app.api.openai.models import resolve_model
from app.api.openai.params import neutral_only, speaking_as
from app.api.openai.schemas import NEUTRAL, ChatCompletionCreate, CompletionCreate, CompletionUsage, Sampling
from app.api.responses import errors
from app.config import Settings
from app.errors import DomainError, InvalidRequest
from app.ml.sequence import Generation
from app.services.metrics import Metrics
from app.services.serving import ResolvedPrompt, Serving
from app.services.tenants import Caller

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
MAX_STOP = 4
STREAM = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or chunks with `stream: true`."}}


@router.post("/completions", responses={**STREAM, **errors(401, 404, 422, 429)})
async def create_completion(
    body: CompletionCreate,
    caller: InferenceCallerDep,
    session: SessionDep,
    settings: SettingsDep,
    serving: ServingDep,
    metrics: MetricsDep,
):
    """Complete each prompt `n` times with a backbone or a tuned model."""
    if body.echo:
        raise InvalidRequest("echo is not supported by this service; omit it.", param="echo")
    resolved = resolve_model(session, serving, caller, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    run = _Run(body, resolved, caller, serving, metrics, settings, prompts, body.max_tokens, "completion")
    session.close()  # nothing more to read; don't hold a connection while the model runs
    return await run.respond()


@router.post("/chat/completions", responses={**STREAM, **errors(401, 404, 422, 429)})
async def create_chat_completion(
    body: ChatCompletionCreate,
    caller: InferenceCallerDep,
    session: SessionDep,
    settings: SettingsDep,
    serving: ServingDep,
    metrics: MetricsDep,
):
    """Answer a chat with a backbone (its chat template) or a tuned model (one user message)."""
    resolved = resolve_model(session, serving, caller, body.model)
    text = _chat_input(body, resolved, serving)
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens
    run = _Run(body, resolved, caller, serving, metrics, settings, [text], max_tokens, "chat")
    session.close()
    return await run.respond()


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
    """One request's generations, as a JSON response or a stream of OpenAI chunks."""

    def __init__(
        self,
        body: Sampling,
        resolved: ResolvedPrompt,
        caller: Caller,
        serving: Serving,
        metrics: Metrics,
        settings: Settings,
        inputs: list[str],
        max_tokens: int,
        kind: str,
    ):
        neutral_only(body, NEUTRAL)
        if max_tokens > settings.max_new_tokens:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}; the limit is {settings.max_new_tokens}.", param="max_tokens"
            )
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise InvalidRequest(f"stop takes up to {MAX_STOP} non-empty strings.", param="stop")
        if len(inputs) * body.n > settings.max_batch_inputs:
            raise InvalidRequest(
                f"{len(inputs)} prompts with n={body.n} make {len(inputs) * body.n} completions; the limit "
                f"is {settings.max_batch_inputs} per request.",
                param="n",
            )
        with speaking_as({"input": "messages" if kind == "chat" else "prompt"}):
            texts, _ = serving.render_inputs(resolved, inputs)
        # Each input n times, adjacent: choice i is input i // n. Row j samples with seed + j, so the n
        # choices differ even with a seed.
        texts = [text for text in texts for _ in range(body.n)]
        requests = serving.generation_requests(
            resolved,
            texts,
            tenant_id=caller.tenant_id,
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=stop,
            seed=body.seed,
        )
        self.handle = serving.start_generation(requests)  # a full queue answers 429 here, before any byte
        self.body, self.kind, self.resolved, self.caller, self.metrics = body, kind, resolved, caller, metrics
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def respond(self):
        if self.body.stream:
            return EventSourceResponse(self._chunks())
        generations = await self.handle.results()
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
