"""Tenants and their API keys. A key is shown once, when it is made; the database keeps its SHA-256 and a
short prefix, so a dump of the keys table lets nobody call the service."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import ApiKey, Tenant, utcnow
from app.errors import InvalidRequest, NotFound

KEY_PREFIX = "sp_"
# Shown in lists so a person can tell keys apart: the fixed "sp_" and the first 8 random characters.
VISIBLE_CHARS = len(KEY_PREFIX) + 8
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass
class NewKey:
    row: ApiKey
    key: str  # the only time the key exists outside its owner's hands


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, *, tenant: str) -> NewKey:
    """A new random key for ``tenant``, created if it is new."""
    if not TENANT_NAME.fullmatch(tenant):
        raise InvalidRequest(
            f"tenant {tenant!r} must be 1-64 lower-case letters, digits, '-' or '_', starting with a letter "
            "or digit.",
            param="tenant",
        )
    owner = session.scalars(select(Tenant).where(Tenant.name == tenant)).first()
    if owner is None:
        owner = Tenant(name=tenant)
        session.add(owner)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits
    row = ApiKey(tenant_id=owner.id, prefix=key[:VISIBLE_CHARS], key_sha256=key_sha256(key))
    session.add(row)
    session.flush()
    return NewKey(row=row, key=key)


def list_keys(session: Session, *, tenant: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).join(Tenant).order_by(ApiKey.id)
    if tenant is not None:
        query = query.where(Tenant.name == tenant)
    return list(session.scalars(query))


def revoke_key(session: Session, *, key_id: int) -> ApiKey:
    """Revoked keys stay listed, with the time; revoking twice keeps the first time."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"No API key with id {key_id}.", param="key_id")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant a live key belongs to; None for an unknown or revoked key."""
    row = session.scalars(select(ApiKey).where(ApiKey.key_sha256 == key_sha256(key))).first()
    if row is None or row.revoked_at is not None:
        return None
    return row.tenant
