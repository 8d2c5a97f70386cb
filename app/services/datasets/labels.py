"""Label sets, wherever they come from: a /v1/classify request, an imported version, a dataset's classes.

Classification scores every label for every input, so the labels are a request's work as much as its
inputs are: their number and each one's length in tokens are bounded here, with one rule for all three
sources, so a task can never hold a label set that its own classify requests would refuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.config import Settings
from app.errors import InvalidRequest
from app.input_text import check_text
from app.ml.text import continuation


@dataclass(frozen=True)
class LabelLimits:
    max_labels: int
    max_label_tokens: int

    @classmethod
    def of(cls, settings: Settings) -> LabelLimits:
        return cls(max_labels=settings.max_labels, max_label_tokens=settings.max_label_tokens)


def label_tokens(count_tokens: Callable[[str], int] | None, label: str) -> int:
    """A label's tokens as it is scored, after an input. Without a tokenizer (a registry-only process),
    its UTF-8 bytes stand in: a byte-level tokenizer never makes more tokens than bytes."""
    if count_tokens is None:
        return len(label.encode())
    return count_tokens(continuation("x", label))


def check_labels(
    labels: list,
    *,
    limits: LabelLimits,
    count_tokens: Callable[[str], int] | None,
    param: str = "labels",
    code: str = "invalid_labels",
    min_labels: int = 2,
) -> list[int]:
    """Each label's tokens, if ``labels`` are at least ``min_labels``, at most ``max_labels``, distinct,
    non-empty strings of at most ``max_label_tokens`` tokens each; otherwise InvalidRequest naming the
    label and the limit."""
    if not isinstance(labels, list) or len(labels) < min_labels:
        raise InvalidRequest(
            f"labels must be a list of at least {min_labels} label(s).", param=param, code=code
        )
    if len(labels) > limits.max_labels:
        raise InvalidRequest(
            f"There are {len(labels)} labels; the limit is {limits.max_labels} (SOFTPROMPT_MAX_LABELS).",
            param=param,
            code="too_many_labels",
        )
    counts = []
    for index, label in enumerate(labels):
        where = f"{param}.{index}"
        if not isinstance(label, str) or not label.strip():
            raise InvalidRequest(f"{where} must be a non-empty string.", param=where, code=code)
        check_text(label, param=where)
        tokens = label_tokens(count_tokens, label)
        if tokens > limits.max_label_tokens:
            raise InvalidRequest(
                f"{where} ({label[:40]!r}) is {tokens} tokens; the limit is {limits.max_label_tokens} "
                "(SOFTPROMPT_MAX_LABEL_TOKENS).",
                param=where,
                code="label_too_long",
            )
        counts.append(tokens)
    if len(set(labels)) != len(labels):
        raise InvalidRequest("labels must be distinct.", param=param, code=code)
    return counts
