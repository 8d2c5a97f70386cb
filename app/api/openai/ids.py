"""OpenAI-style ids over our integer ids (model names: app/services/registry/model_names.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from app.contract.kinds import MAX_ID
from app.errors import NotFound
from app.services.registry.model_names import NUMBER

FILE = "file-"
JOB = "ftjob-"
EVENT = "ftevent-"
CHECKPOINT = "ftckpt-"


def to_id(prefix: str, value: int) -> str:
    return f"{prefix}{value}"


def from_id(prefix: str, value: str, *, what: str, param: str) -> int:
    """Our integer id, or 404 worded like any missing object: a malformed id names nothing that exists."""
    number = value.removeprefix(prefix)
    if value.startswith(prefix) and NUMBER.fullmatch(number) and int(number) <= MAX_ID:
        return int(number)
    raise NotFound(f"No {what} with id {value!r}.", param=param)


def cursor(prefix: str, value: str | None, *, param: str = "after") -> int | None:
    """A list's `after` cursor: the id of the last item of the previous page, as the SDK sends it."""
    return None if value is None else from_id(prefix, value, what="item", param=param)


def unix(moment: datetime) -> int:
    """OpenAI's times are Unix seconds; SQLite hands back naive datetimes, which are UTC here."""
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
