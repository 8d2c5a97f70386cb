"""Idempotency-Key: a retried create returns what the first request made; the same key with another body
is refused. A key is unique within its tenant's rows, so two racing requests cannot both create, and
one tenant's keys say nothing about another's."""

from __future__ import annotations

import hashlib
import json
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict

Row = TypeVar("Row")


def fingerprint(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def earlier(
    session: Session, model: type[Row], *, tenant_id: int, key: str | None, request_sha256: str
) -> Row | None:
    """The row an earlier request with ``key`` created, or None; Conflict if that request differed."""
    if not key:
        return None
    query = select(model).where(model.tenant_id == tenant_id, model.idempotency_key == key)
    row = session.scalars(query).first()
    if row is not None and row.request_sha256 != request_sha256:
        raise Conflict(
            "This Idempotency-Key was already used with a different request body.",
            code="idempotency_key_reused",
        )
    return row


def insert(session: Session, row: Row) -> tuple[Row, bool]:
    """``row`` (which carries its tenant_id, idempotency_key and request_sha256) added and True; or, when a
    request with the same key raced it and inserted first, that request's row and False."""
    tenant_id, key, request_sha256 = row.tenant_id, row.idempotency_key, row.request_sha256
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()  # the key is unique within the tenant's rows: the other request won
        existing = earlier(session, type(row), tenant_id=tenant_id, key=key, request_sha256=request_sha256)
        if existing is None:
            raise
        return existing, False
    return row, True
