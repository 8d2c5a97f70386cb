"""One generation, whichever route asked for it: its bounds checked before any work, its inputs made into
rows, the rows started on the engine, and the results collected and counted once. The native route
(/v1/generate) and the OpenAI-compatible ones (/v1/completions, /v1/chat/completions) keep only their
protocol's encoding of the request and of the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from app.config import Settings
from app.ml.row import Generation, GenerationRequest
from app.services.api_metrics import Metrics
from app.services.serving import limits
from app.services.serving.serving import GenerationHandle, ResolvedTask, RowUpdate, Serving
from app.services.tenancy.tenants import Caller


@dataclass(frozen=True)
class Sampling:
    """How each input is decoded, as the request asked."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    n: int = 1  # completions per input; an input's rows are adjacent, choice i is input i // n
    tokens_param: str = "max_new_tokens"  # the protocol's name for max_new_tokens, for errors


def check(settings: Settings, sampling: Sampling) -> None:
    """A generation's own bounds, before anything is read (app/services/serving/limits.py)."""
    limits.check_sampling(
        settings,
        max_new_tokens=sampling.max_new_tokens,
        stop=sampling.stop,
        tokens_param=sampling.tokens_param,
    )


def rows(
    serving: Serving, resolved: ResolvedTask, inputs: list[str], sampling: Sampling, *, tenant_id: int
) -> list[GenerationRequest]:
    """Each input rendered into the template, tokenised, checked against the limits and repeated ``n``
    times. Blocking (tokenizer), so called off the event loop."""
    texts, _ = serving.render_inputs(resolved, inputs, n=sampling.n)
    # Row j samples with seed + j, so the n completions of one input differ even with a seed.
    texts = [text for text in texts for _ in range(sampling.n)]
    return serving.generation_requests(
        resolved,
        texts,
        tenant_id=tenant_id,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=sampling.stop,
        seed=sampling.seed,
    )


def start(
    serving: Serving,
    metrics: Metrics,
    *,
    caller: Caller,
    route: str,
    resolved: ResolvedTask,
    requests: list[GenerationRequest],
) -> GenerationRun:
    """The rows queued now (a full queue answers 429 here, before any byte is sent)."""
    handle = serving.start_generation(requests)
    return GenerationRun(handle, metrics, caller=caller, route=route, resolved=resolved)


class GenerationRun:
    """A started generation, read once: whole (``results``) or as it comes (``updates``). Either counts the
    served inputs and tokens when the last row is done; leaving early cancels the rows still running."""

    def __init__(
        self,
        handle: GenerationHandle,
        metrics: Metrics,
        *,
        caller: Caller,
        route: str,
        resolved: ResolvedTask,
    ):
        self.resolved = resolved
        self.generations: list[Generation] = []  # every row's result, in input order, once all are done
        self._handle, self._metrics, self._caller, self._route = handle, metrics, caller, route

    def cancel(self) -> None:
        self._handle.cancel()

    async def updates(self) -> AsyncIterator[RowUpdate]:
        """Each row's text as it becomes final, and its result when it is done."""
        finished: dict[int, Generation] = {}
        async for update in self._handle.updates():
            if update.finished is not None:
                finished[update.index] = update.finished
            yield update
        self.generations = [finished[i] for i in sorted(finished)]
        self._metrics.served(
            tenant=self._caller.tenant,
            task=self.resolved.task,
            route=self._route,
            inputs=len(self.generations),
            tokens=sum(g.tokens for g in self.generations),
        )

    async def results(self) -> list[Generation]:
        async for _ in self.updates():
            pass
        return self.generations
