"""Taking turns on the workers, across tenants: which queued run a free worker takes, and when a running one
gives its worker up.

The broker's message says "there is a run to do"; the rows decide which. A worker takes the queued run of
the tenant served least: the one with the fewest runs going, then the one whose last run started longest
ago, then that tenant's oldest run. So ten jobs queued by one tenant do not keep a second tenant's job
waiting behind all ten: it starts when the first of them ends or yields.

A run yields at its time slice (``SOFTPROMPT_RUN_TIME_SLICE_S``) when another tenant's run is waiting: a
job saves its checkpoint, an evaluation the rows already scored, and it goes back to the queue without
counting as an attempt. Every message still runs one row, so no queued row is left without one: a row whose
message ran another tenant's run is run by that run's message, or sent again by the reaper."""

from __future__ import annotations

import logging
import time
from datetime import datetime

from sqlalchemy import case, func, select, union_all

from app.contract.kinds import JobStatus
from app.db.models import Evaluation, TuningJob
from app.db.session import session_scope
from app.services.runs.leases import Leased

log = logging.getLogger(__name__)

# Queued rows looked at when a worker chooses one: the oldest this many. Past it, the newest rows wait
# for the reaper's resend or for the queue to shorten, and are never lost.
CANDIDATES = 500
# How often a running run asks whether another tenant's run is waiting, once its slice is spent.
WAITING_POLL_S = 2.0

_RUNS = (TuningJob, Evaluation)


def next_run(*, db_url: str, kind: Leased, preferred: int) -> int:
    """The queued row of ``kind`` this worker should take now: ``preferred`` (the message's own row) unless
    another tenant has been served less. ``preferred`` when nothing is queued (its claim then skips)."""
    table = kind.table
    with session_scope(db_url) as session:
        queued = session.execute(
            select(table.id, table.tenant_id)
            .where(table.status == JobStatus.QUEUED)
            .order_by(table.created_at, table.id)
            .limit(CANDIDATES)
        ).all()
        if not queued:
            return preferred
        tenants = {tenant for _, tenant in queued}
        served = _served(session, tenants)
    owner = dict(queued).get(preferred)

    def turn(tenant: int) -> tuple[int, float]:
        running, last_started = served.get(tenant, (0, None))
        return running, last_started.timestamp() if last_started else float("-inf")

    first = min(tenants, key=turn)
    if owner is not None and turn(owner) <= turn(first):
        return preferred
    return next(row_id for row_id, tenant in queued if tenant == first)


def _served(session, tenants: set[int]) -> dict[int, tuple[int, datetime | None]]:
    """Per tenant: (runs going now, when its last run started), over jobs and evaluations together."""
    rows = union_all(
        *(
            select(
                table.tenant_id.label("tenant_id"),
                (table.status == JobStatus.RUNNING).label("running"),
                table.started_at.label("started_at"),
            ).where(table.tenant_id.in_(tenants), table.started_at.is_not(None))
            for table in _RUNS
        )
    ).subquery()
    running = func.sum(case((rows.c.running, 1), else_=0))
    summary = session.execute(
        select(rows.c.tenant_id, running, func.max(rows.c.started_at)).group_by(rows.c.tenant_id)
    ).all()
    return {tenant: (int(count or 0), last) for tenant, count, last in summary}


def others_waiting(*, db_url: str, tenant_id: int) -> bool:
    """Whether a run of another tenant is queued, jobs or evaluations."""
    with session_scope(db_url) as session:
        for table in _RUNS:
            waiting = session.execute(
                select(table.id)
                .where(table.status == JobStatus.QUEUED, table.tenant_id != tenant_id)
                .limit(1)
            ).first()
            if waiting is not None:
                return True
    return False


class TimeSlice:
    """A run's share of its worker. ``spent()`` is true once the run has had ``seconds`` and another
    tenant's run is waiting (asked every WAITING_POLL_S, not at every step). ``seconds`` 0: never."""

    def __init__(self, *, db_url: str, tenant_id: int, seconds: float):
        self.db_url, self.tenant_id, self.seconds = db_url, tenant_id, seconds
        self._ends = time.monotonic() + seconds
        self._last_poll = 0.0
        self.yielded = False

    def spent(self) -> bool:
        if self.yielded:
            return True
        now = time.monotonic()
        if self.seconds <= 0 or now < self._ends or now - self._last_poll < WAITING_POLL_S:
            return False
        self._last_poll = now
        try:
            self.yielded = others_waiting(db_url=self.db_url, tenant_id=self.tenant_id)
        except Exception as error:  # the registry away for a while: keep the worker, ask again later
            log.warning("could not look for waiting runs: %s", error)
        return self.yielded
