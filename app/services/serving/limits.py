"""Every bound on an inference request, in one place, each checked before the work it bounds: 422 naming
the field past its limit. The settings name each limit (SOFTPROMPT_MAX_*)."""

from __future__ import annotations

from app.config import Settings
from app.errors import InvalidRequest


def check_sampling(
    settings: Settings, *, max_new_tokens: int, stop: list[str], tokens_param: str = "max_new_tokens"
) -> None:
    """A generation's own bounds, before anything is read: new tokens, and the number and length of its
    stop strings (each is looked for in the newest text at every step)."""
    if max_new_tokens > settings.max_new_tokens:
        raise InvalidRequest(
            f"{tokens_param} is {max_new_tokens}; the limit is {settings.max_new_tokens}.", param=tokens_param
        )
    if len(stop) > settings.max_stop_strings:
        raise InvalidRequest(
            f"There are {len(stop)} stop strings; the limit is {settings.max_stop_strings} "
            "(SOFTPROMPT_MAX_STOP_STRINGS).",
            param="stop",
        )
    for text in stop:
        if not text:
            raise InvalidRequest("stop strings must not be empty.", param="stop")
        if len(text) > settings.max_stop_chars:
            raise InvalidRequest(
                f"A stop string is {len(text)} characters; the limit is {settings.max_stop_chars} "
                "(SOFTPROMPT_MAX_STOP_CHARS).",
                param="stop",
            )


def check_input_count(settings: Settings, inputs: int, *, n: int = 1) -> None:
    """The request's inputs, and its completions (``n`` per input)."""
    limit = settings.max_batch_inputs
    if not inputs:
        raise InvalidRequest("input must not be empty.", param="input")
    if inputs > limit:
        raise InvalidRequest(f"At most {limit} inputs per request; got {inputs}.", param="input")
    if n > 1 and inputs * n > limit:
        raise InvalidRequest(
            f"{inputs} prompts with n={n} make {inputs * n} completions; the limit is {limit} per request.",
            param="n",
        )


def check_input_lengths(settings: Settings, lengths: list[int], *, virtual_tokens: int) -> None:
    """Each templated input's tokens, with the soft prompt's positions in front of it."""
    for index, length in enumerate(lengths):
        if length + virtual_tokens > settings.max_input_tokens:
            raise InvalidRequest(
                f"input[{index}] is {length} tokens after the template (+{virtual_tokens} virtual tokens); "
                f"the limit is {settings.max_input_tokens}.",
                param="input",
                code="input_too_long",
            )


def check_classify_work(settings: Settings, *, inputs: int, label_tokens: int) -> None:
    """A classification's work: its inputs times all its labels' tokens."""
    work, limit = inputs * label_tokens, settings.max_classify_tokens
    if work > limit:
        raise InvalidRequest(
            f"{inputs} inputs times {label_tokens} label tokens make {work} tokens to score; the limit is "
            f"{limit} per request (SOFTPROMPT_MAX_CLASSIFY_TOKENS). Send fewer inputs or labels.",
            param="input",
        )
