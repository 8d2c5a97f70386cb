"""Cursor pagination for the list routes: newest first; `after` is the last id of the previous page."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

T = TypeVar("T")


def paginate(
    session: Session, query: Select[Any], *, id_column: Any, limit: int, after: int | None
) -> tuple[list[Any], bool]:
    if after is not None:
        query = query.where(id_column < after)
    rows = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
