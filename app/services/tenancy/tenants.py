"""Who is calling: the tenant behind an API key (or the open default), with the quotas in force for it."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import DEFAULT_TENANT, ApiKey, Tenant
from app.errors import InvalidRequest, NotFound
from app.services.tenancy.api_keys import tenant_for_key


@dataclass(frozen=True)
class Caller:
    """A request's tenant. Every service function that reads or writes a tenant's objects takes one."""

    tenant_id: int
    tenant: str
    max_active_jobs: int
    upload_bytes_per_hour: int
    inference_rps: int


def caller_of(tenant: Tenant, settings: Settings) -> Caller:
    """The tenant's own quotas where it has them, the server's defaults where it does not."""

    def pick(own: int | None, default: int) -> int:
        return default if own is None else own

    return Caller(
        tenant_id=tenant.id,
        tenant=tenant.name,
        max_active_jobs=pick(tenant.max_active_jobs, settings.tenant_max_active_jobs),
        upload_bytes_per_hour=pick(tenant.upload_bytes_per_hour, settings.tenant_upload_bytes_per_hour),
        inference_rps=pick(tenant.inference_rps, settings.tenant_inference_rps),
    )


def caller_for_key(session: Session, *, key: str, settings: Settings) -> Caller | None:
    tenant = tenant_for_key(session, key)
    return None if tenant is None else caller_of(tenant, settings)


def live_keys_exist(session: Session) -> bool:
    return session.scalars(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)).first() is not None


def default_caller(session: Session, *, settings: Settings) -> Caller:
    """The tenant the open loopback mode serves (the migration made it)."""
    return caller_of(get_tenant(session, name=DEFAULT_TENANT), settings)


def get_tenant(session: Session, *, name: str) -> Tenant:
    tenant = session.scalars(select(Tenant).where(Tenant.name == name)).first()
    if tenant is None:
        raise NotFound(f"No tenant named {name!r}.", param="tenant")
    return tenant


QUOTA_FIELDS = ("max_active_jobs", "upload_bytes_per_hour", "inference_rps")


def set_quotas(session: Session, *, name: str, values: dict[str, int | None]) -> Tenant:
    """Set the given quotas for one tenant; a value of -1 returns that quota to the server's default."""
    tenant = get_tenant(session, name=name)
    for field, value in values.items():
        if field not in QUOTA_FIELDS:
            raise InvalidRequest(f"Unknown quota {field!r}.", param=field)
        if value is None:
            continue
        if value < -1:
            raise InvalidRequest(
                f"{field} must be 0 or more (or -1 for the server's default); got {value}.", param=field
            )
        setattr(tenant, field, None if value == -1 else value)
    return tenant
