"""Each tenant's quotas: jobs queued or running at once, bytes uploaded per hour, inference requests per
second. Past one, QuotaExceeded: a 429 whose Retry-After says when the request can succeed."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from limits import RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import func, select, union_all, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.contract.kinds import ACTIVE_STATUSES
from app.db.models import Dataset, PromptVersion, Task, Tenant, TuningJob, utcnow
from app.errors import PayloadTooLarge, QuotaExceeded
from app.services.tenancy.tenants import Caller

log = logging.getLogger(__name__)
UPLOAD_WINDOW = timedelta(hours=1)
JOB_RETRY_AFTER_S = 30


def check_active_jobs(session: Session, *, caller: Caller, table: type = TuningJob) -> None:
    """At most the tenant's max_active_jobs of ``table`` (tuning jobs, or evaluations: counted apart)
    queued or running."""
    # A write that changes nothing, before counting: it locks the tenant's row on PostgreSQL and takes the
    # database's write lock on SQLite until the caller commits, so requests racing for the last place take
    # turns instead of all counting the same jobs.
    session.execute(update(Tenant).where(Tenant.id == caller.tenant_id).values(id=Tenant.id))
    active = session.scalar(
        select(func.count())
        .select_from(table)
        .where(table.tenant_id == caller.tenant_id, table.status.in_(ACTIVE_STATUSES))
    )
    if active >= caller.max_active_jobs:
        noun = "jobs" if table is TuningJob else "evaluations"
        raise QuotaExceeded(
            f"Your tenant has {active} {noun} queued or running; its limit is {caller.max_active_jobs}. "
            "Wait for one to finish, or cancel one.",
            code="job_quota_exceeded" if table is TuningJob else "evaluation_quota_exceeded",
            retry_after_s=JOB_RETRY_AFTER_S,
        )


def check_upload(session: Session, *, caller: Caller, size: int) -> None:
    """Bytes the tenant uploaded in the last hour (and still keeps), datasets and imported versions alike,
    plus this file."""
    limit = caller.upload_bytes_per_hour
    if size > limit:
        raise PayloadTooLarge(
            f"The file is {size} bytes; your tenant may upload {limit} bytes per hour.",
            param="file",
            code="upload_quota_exceeded",
        )
    now = utcnow()
    since = now - UPLOAD_WINDOW
    datasets = select(Dataset.created_at, Dataset.size_bytes.label("size")).where(
        Dataset.tenant_id == caller.tenant_id, Dataset.created_at > since
    )
    imports = (
        select(PromptVersion.created_at, PromptVersion.upload_bytes.label("size"))
        .join(Task)
        .where(
            Task.tenant_id == caller.tenant_id,
            PromptVersion.upload_bytes.is_not(None),
            PromptVersion.created_at > since,
        )
    )
    uploads = union_all(datasets, imports).subquery()
    recent = session.execute(
        select(uploads.c.created_at, uploads.c.size).order_by(uploads.c.created_at)
    ).all()
    used = sum(nbytes for _, nbytes in recent)
    if used + size <= limit:
        return
    # The file fits once enough of the oldest uploads have left the window.
    to_free, freed, wait_s = used + size - limit, 0, UPLOAD_WINDOW.total_seconds()
    for created_at, nbytes in recent:
        freed += nbytes
        if freed >= to_free:
            wait_s = (created_at + UPLOAD_WINDOW - now).total_seconds()
            break
    raise QuotaExceeded(
        f"Your tenant uploaded {used} bytes in the last hour; this file's {size} more would pass its limit "
        f"of {limit} bytes per hour.",
        param="file",
        code="upload_quota_exceeded",
        retry_after_s=wait_s,
    )


class InferenceRateLimiter:
    """Requests per second per tenant over a moving one-second window, counted in this process or, with
    Settings.rate_limit_url, in Redis for all replicas together."""

    def __init__(self, settings: Settings):
        url = settings.rate_limit_url or "memory://"
        options = {}
        if "redis" in url:
            # Short timeouts: an unresponsive Redis must let requests through quickly, not hang them.
            prefix = f"{settings.broker_key_prefix}softprompt-rate"
            options = {"key_prefix": prefix, "socket_timeout": 1.0, "socket_connect_timeout": 1.0}
        self._limiter = MovingWindowRateLimiter(storage_from_string(url, **options))

    def hit(self, caller: Caller) -> None:
        item = RateLimitItemPerSecond(caller.inference_rps)
        try:
            if self._limiter.hit(item, "inference", str(caller.tenant_id)):
                return
            reset_at, _ = self._limiter.get_window_stats(item, "inference", str(caller.tenant_id))
        except Exception as error:
            # The counter's store is away: serving without the limit beats refusing everyone.
            log.warning("rate limit store unreachable, request let through: %s", error)
            return
        raise QuotaExceeded(
            f"Your tenant may send {caller.inference_rps} inference requests per second; retry shortly.",
            code="rate_limited",
            retry_after_s=reset_at - time.time(),
        )
