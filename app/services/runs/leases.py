"""Who owns a job (or an evaluation: the same columns, the same rules): a lease in its row. A worker claims
a queued row with a compare-and-set, a heartbeat renews the lease while it runs, and the reaper takes back
rows whose lease lapsed (a killed worker) or whose message never arrived (a flushed Redis, an embedded
broker's worker killed with the message in memory). The broker only says "run job N"; the row decides
whether there is still work to do.

Every change here is a conditional UPDATE, so two workers, or a worker and the reaper, never both win."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import select, update

from app.config import Settings
from app.contract.kinds import ACTIVE_STATUSES, JobStatus
from app.db.models import Evaluation, TuningJob, utcnow
from app.db.session import session_scope
from app.services.runs.queue import enqueue_evaluation, enqueue_training
from app.services.tuning import checkpoints
from app.services.tuning import jobs as jobs_service

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leased:
    """A kind of row that workers lease: its table, what it is called in messages, how its message is
    sent, and what a status change writes beside the row (a job's event log) or removes when it ends (what
    a run keeps between attempts: a job's checkpoint, an evaluation's answers so far)."""

    table: type[TuningJob] | type[Evaluation]
    noun: str
    enqueue: Callable[[Settings, int], None]
    record: Callable[..., None] = lambda session, row, **event: None
    discard: Callable[..., None] = lambda session, row_id: None


JOBS = Leased(
    TuningJob,
    "job",
    enqueue_training,
    record=lambda session, row, **event: jobs_service.add_event(session, job=row, **event),
    discard=lambda session, row_id: checkpoints.discard(session, job_id=row_id),
)
EVALUATIONS = Leased(
    Evaluation,
    "evaluation",
    enqueue_evaluation,
    discard=lambda session, row_id: setattr(session.get(Evaluation, row_id), "partial_answers", None),
)


def claim(*, db_url: str, job_id: int, worker: str, lease_s: float, kind: Leased = JOBS) -> bool:
    """queued -> running with a fresh lease. False when the row is not queued: a duplicate delivery, work
    another worker holds, or work cancelled before it started."""
    now, table = utcnow(), kind.table
    with session_scope(db_url) as session:
        claimed = session.execute(
            update(table)
            .where(table.id == job_id, table.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                started_at=now,
                worker=worker,
                attempts=table.attempts + 1,
                lease_expires_at=now + timedelta(seconds=lease_s),
            )
        ).rowcount
        if claimed:
            row = session.get(table, job_id)
            kind.record(
                session,
                row,
                type="status",
                message=f"{kind.noun.capitalize()} started (attempt {row.attempts}).",
                data={"status": JobStatus.RUNNING, "worker": worker, "attempt": row.attempts},
            )
        return bool(claimed)


def renew(*, db_url: str, job_id: int, worker: str, lease_s: float, kind: Leased = JOBS) -> bool:
    """Extends the lease if ``worker`` still holds the row; False once it does not."""
    table = kind.table
    with session_scope(db_url) as session:
        return bool(
            session.execute(
                update(table)
                .where(table.id == job_id, table.status == JobStatus.RUNNING, table.worker == worker)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            ).rowcount
        )


class Heartbeat:
    """Renews a job's lease every third of its length from a thread of its own, so a long training step
    never lets it lapse. ``lost`` is set once the row no longer names this worker (the reaper gave the job
    to another after a long outage): the trainer then stops and writes nothing."""

    def __init__(self, *, db_url: str, job_id: int, worker: str, lease_s: float, kind: Leased = JOBS):
        self._renew = lambda: renew(db_url=db_url, job_id=job_id, worker=worker, lease_s=lease_s, kind=kind)
        self._interval = lease_s / 3
        self.lost = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{kind.noun}-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                if not self._renew():
                    self.lost.set()
                    return
            except Exception as error:  # the database away for a while: the next beat tries again
                log.warning("could not renew a lease: %s", error)


class Lapsed(StrEnum):
    """What the reaper did with a job whose lease lapsed; each names a list of Reaped."""

    RESENT = "resent"
    REQUEUED = "requeued"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class Reaped:
    requeued: list[int] = field(default_factory=list)  # lease lapsed: queued again for another attempt
    failed: list[int] = field(default_factory=list)  # lease lapsed on the last allowed attempt
    cancelled: list[int] = field(default_factory=list)  # lease lapsed after a cancel was asked for
    resent: list[int] = field(default_factory=list)  # queued, unclaimed for too long: message sent again


def reap(
    settings: Settings, *, enqueue: Callable[[Settings, int], None] | None = None, kind: Leased = JOBS
) -> Reaped:
    """One pass over the rows of ``kind`` whose lease lapsed (``enqueue``: its sender, unless given).
    Safe to run from any number of processes at once."""
    now, reaped, table = utcnow(), Reaped(), kind.table
    enqueue = enqueue or kind.enqueue
    with session_scope(settings.registry_url) as session:
        lapsed = session.execute(
            select(table.id, table.status, table.attempts, table.cancel_requested).where(
                table.status.in_(ACTIVE_STATUSES), table.lease_expires_at < now
            )
        ).all()
    for job_id, status, attempts, cancel_requested in lapsed:
        outcome, values, event = _decide(status, attempts, cancel_requested, settings, now, kind.noun)
        with session_scope(settings.registry_url) as session:
            won = session.execute(
                update(table)
                .where(table.id == job_id, table.status == status, table.lease_expires_at < now)
                .values(lease_expires_at=now + timedelta(seconds=settings.job_resend_after_s), **values)
            ).rowcount
            if not won:
                continue  # the worker renewed in time, or another reaper got there first
            if outcome in (Lapsed.FAILED, Lapsed.CANCELLED):
                kind.discard(session, job_id)
            if event is not None:
                kind.record(session, session.get(table, job_id), **event)
        getattr(reaped, outcome).append(job_id)
        if outcome in (Lapsed.REQUEUED, Lapsed.RESENT):
            _send(settings, job_id, enqueue, table)
    return reaped


def _decide(
    status: str, attempts: int, cancel_requested: bool, settings: Settings, now: datetime, noun: str
) -> tuple[Lapsed, dict, dict | None]:
    """(what happens, the row's new values, the event that says so) for one row whose lease lapsed."""
    if status == JobStatus.QUEUED:
        return Lapsed.RESENT, {}, None
    if cancel_requested:
        message = "The worker stopped answering after the cancel; nothing written."
        values = {"status": JobStatus.CANCELLED, "finished_at": now}
        return Lapsed.CANCELLED, values, _status_event(message, JobStatus.CANCELLED)
    if attempts >= settings.job_max_attempts:
        message = (
            f"The worker running this {noun} stopped answering on each of its {attempts} attempts "
            f"(the limit); the {noun} is not retried again."
        )
        values = {
            "status": JobStatus.FAILED,
            "finished_at": now,
            "error_code": "worker_lost",
            "error_message": message,
        }
        return (
            Lapsed.FAILED,
            values,
            {
                "type": "error",
                "message": message,
                "data": {"status": JobStatus.FAILED, "code": "worker_lost"},
            },
        )
    message = f"The worker stopped answering during attempt {attempts}; the {noun} is queued again."
    values = {"status": JobStatus.QUEUED, "worker": None}
    return Lapsed.REQUEUED, values, _status_event(message, JobStatus.QUEUED)


def _status_event(message: str, status: JobStatus) -> dict:
    return {"type": "status", "message": message, "data": {"status": status}}


def _send(settings: Settings, job_id: int, enqueue: Callable[[Settings, int], None], table) -> None:
    try:
        enqueue(settings, job_id)
    except Exception as error:  # the broker away: leave the row due, so the next pass sends it again
        log.warning("could not send %s %s to the broker: %s", table.__tablename__, job_id, error)
        with session_scope(settings.registry_url) as session:
            session.execute(
                update(table)
                .where(table.id == job_id, table.status == JobStatus.QUEUED)
                .values(lease_expires_at=utcnow())
            )
