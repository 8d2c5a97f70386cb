"""OpenAI-style ids over our integer ids, and model names over task references."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from app.db.models import MAX_ID
from app.errors import NotFound

FILE = "file-"
JOB = "ftjob-"
EVENT = "ftevent-"
CHECKPOINT = "ftckpt-"

_NUMBER = re.compile(r"[1-9][0-9]{0,18}")


def to_id(prefix: str, value: int) -> str:
    return f"{prefix}{value}"


def from_id(prefix: str, value: str, *, what: str, param: str) -> int:
    """Our integer id, or 404 worded like any missing object: a malformed id names nothing that exists."""
    number = value.removeprefix(prefix)
    if value.startswith(prefix) and _NUMBER.fullmatch(number) and int(number) <= MAX_ID:
        return int(number)
    raise NotFound(f"No {what} with id {value!r}.", param=param)


def cursor(prefix: str, value: str | None, *, param: str = "after") -> int | None:
    """A list's `after` cursor: the id of the last item of the previous page, as the SDK sends it."""
    return None if value is None else from_id(prefix, value, what="item", param=param)


def fine_tuned_model(backbone: str, task: str, version: int) -> str:
    return f"ft:{backbone}:{task}:{version}"


def task_ref_of_model(model: str, backbones: set[str]) -> tuple[str | None, str | None]:
    """(backbone, task reference) that a `model` names: a backbone alone (no task), a
    `ft:<backbone>:<task>:<version>` name, or a task reference as the native routes take it
    ('sentiment', 'sentiment@3')."""
    if model in backbones:
        return model, None
    if model.startswith("ft:"):
        parts = model.split(":")
        if len(parts) != 4 or not _NUMBER.fullmatch(parts[3]):
            raise NotFound(
                f"The model {model!r} does not exist: a tuned model is named ft:<backbone>:<task>:<version>.",
                param="model",
                code="model_not_found",
            )
        return parts[1], f"{parts[2]}@{parts[3]}"
    return None, model


def unix(moment: datetime) -> int:
    """OpenAI's times are Unix seconds; SQLite hands back naive datetimes, which are UTC here."""
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
