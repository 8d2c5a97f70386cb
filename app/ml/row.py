"""One generation request and the row it becomes: how its next token is chosen, when it stops, and which
part of its text is safe to stream."""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GenerationRequest:
    context: list[int]  # the rendered input's token ids, already fitted to the window
    prompt: torch.Tensor | None  # a soft prompt of either kind (app/ml/soft_prompt.py), or None: bare
    # Names the prompt's immutable content (a version's id and checksum) so its keys and values are
    # computed once for all requests; None computes them for this request alone.
    prompt_key: Hashable | None
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # sampling seed of this row alone, so batching never changes its text
    input_tokens: int = 0  # what usage reports: the caller's tokens (an empty input is fed as one EOS)
    # Who the row is served for: the engine shares batch places and queue room fairly between tenants.
    # None is one anonymous tenant.
    tenant: Hashable | None = None

    @property
    def virtual_tokens(self) -> int:
        return 0 if self.prompt is None else int(self.prompt.shape[-2])


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: int  # completion tokens, the end-of-sequence token not counted
    input_tokens: int  # the caller's tokens (usage's prompt_tokens), virtual tokens not counted
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Row:
    """A request's row while it is generating."""

    request: GenerationRequest
    produced: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    streamed: int = 0  # characters of ``text`` already handed out by stream_delta
    cancelled: bool = False  # set by the caller's thread (client gone); the engine drops the row
    error: Exception | None = None  # why the engine gave up on the row
    generator: torch.Generator | None = None
    queued_at: float = field(default_factory=time.monotonic)  # for the queue-time metric

    def __post_init__(self):
        if self.request.temperature > 0:
            self.generator = torch.Generator()
            if self.request.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.request.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def result(self) -> Generation:
        return Generation(
            self.text,
            self.finish_reason or "length",
            len(self.produced),
            self.request.input_tokens,
            list(self.produced),
        )

    def advance(self, tokenizer, token: int, eos: int) -> None:
        """Take ``token`` as this row's next token and decide whether the row is finished."""
        if token == eos:
            self.finish_reason = "stop"
            return
        self.produced.append(token)
        # Decoding the whole completion each time keeps multi-token characters and merges right.
        previous, self.text = self.text, tokenizer.decode(self.produced, skip_special_tokens=True)
        hit = first_stop(self.text, self.request.stop, checked=unchanged_prefix(previous, self.text))
        if hit is not None:
            self.text = self.text[:hit]
            self.finish_reason = "stop"
        elif len(self.produced) >= self.request.max_new_tokens:
            self.finish_reason = "length"

    def stream_delta(self) -> str:
        """The text not yet streamed that can no longer change: a finished row gives all of it; a running
        row holds back a trailing half character and any tail that could still grow into a stop string."""
        end = len(self.text)
        if not self.done:
            if self.text.endswith("\ufffd"):
                end -= 1
            end -= partial_stop(self.text[:end], self.request.stop)
        end = max(end, self.streamed)
        delta = self.text[self.streamed : end]
        self.streamed = end
        return delta


# Stop strings are looked for only where the text is new, so a step costs each stop string about its own
# length whatever the length of the text, and nothing is copied in proportion to a stop string's square.


def unchanged_prefix(previous: str, text: str) -> int:
    """How many leading characters ``text`` shares with ``previous``: all of ``previous`` as a rule; less
    when the newest token completed a character or the decoder's clean-up rewrote the end."""
    if text.startswith(previous):
        return len(previous)
    low, high = 0, min(len(previous), len(text))  # the shared length lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if text.startswith(previous[:middle]):
            low = middle
        else:
            high = middle - 1
    return low


def first_stop(text: str, stops: tuple[str, ...], *, checked: int) -> int | None:
    """Where the earliest stop string in ``text`` begins, or None. ``text[:checked]`` was searched before
    and held none, so a new occurrence ends after it: the search starts a stop's length before it."""
    hits = [found for stop in stops if (found := text.find(stop, max(0, checked - len(stop) + 1))) >= 0]
    return min(hits, default=None)


def partial_stop(head: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``head`` that begins some stop string (and could still grow into
    it): that much text is held back from the stream."""
    longest = 0
    for stop in stops:
        # A candidate starts at an occurrence of the stop's first character among the last len(stop) - 1
        # characters; the earliest one that matches is the longest.
        start = head.find(stop[0], max(0, len(head) - len(stop) + 1))
        while start >= 0:
            if stop.startswith(head[start:]):
                longest = max(longest, len(head) - start)
                break
            start = head.find(stop[0], start + 1)
    return longest


# Below this a temperature decodes greedily: dividing logits by a vanishing temperature overflows to inf
# and leaves no distribution to sample from, while the limit of sampling as it goes to 0 is the argmax.
MIN_SAMPLING_TEMPERATURE = 1e-4


# Why a row fails when its scores are not finite: the version's fault, not the request's or the engine's.
UNDECODABLE = (
    "this task's soft prompt gives the backbone scores that are not finite numbers; the version is "
    "unusable: retrain or delete it"
)


def choose_tokens(logits: torch.Tensor, rows: list[Row]) -> list[int | None]:
    """[B, V] float32 logits -> each row's next token under its own sampling parameters, or None for a row
    whose scores cannot be decoded: not finite (a soft prompt of extreme values overflows the backbone),
    or no distribution left to sample from. Such a row fails alone; the batch's other rows go on."""
    chosen: list[int | None] = logits.argmax(-1).tolist()
    finite = torch.isfinite(logits).all(-1).tolist()  # [B]
    for i, row in enumerate(rows):
        if not finite[i]:
            chosen[i] = None
        elif row.request.temperature >= MIN_SAMPLING_TEMPERATURE:
            try:
                chosen[i] = _sample(logits[i], row.request.temperature, row.request.top_p, row.generator)
            except RuntimeError:  # torch.multinomial on probabilities that overflowed
                chosen[i] = None
    return chosen


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = (logits.float().cpu() / temperature).softmax(-1)  # [V]; on CPU so a seed means the same anywhere
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p. The top token always survives, set explicitly:
        # a top_p too small for float32 compares as 0.0 and would drop it too.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop[0] = False
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))
