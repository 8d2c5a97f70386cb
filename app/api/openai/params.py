"""Errors from the shared services name our fields (`training_dataset`, `task`); a client of the
OpenAI-shaped routes sent other names (`training_file`, `model`), so the error is re-addressed to them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import DomainError, InvalidRequest


@contextmanager
def speaking_as(params: dict[str, str]) -> Iterator[None]:
    try:
        yield
    except DomainError as error:
        if error.param in params:
            error.param = params[error.param]
        raise


def neutral_only(body, neutral: dict) -> None:
    """Fields a client may send with their neutral value only (OpenAI features this service lacks)."""
    for field, value in neutral.items():
        given = getattr(body, field)
        if given is not None and given != value:
            raise InvalidRequest(f"{field} is not supported by this service; omit it.", param=field)
