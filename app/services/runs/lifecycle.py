"""One run of a leased row on a worker, a tuning job (app/services/tuning/training.py) or an evaluation
(app/services/evaluation/evaluating.py): the lifecycle both share, so that only their bodies differ.

    claim (app/services/runs/leases.py) -> heartbeat -> the body, watched (RunWatch: progress, cancel, turn)
      -> one ending, written through the RunOwner only while this worker still holds the row

A body that raises fails its row, saying why. A run whose worker shuts down (HANDBACK) or whose time slice
ends with another tenant's run waiting (app/services/runs/turns.py) goes back to the queue with its state
saved (requeue), not counted as an attempt."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.contract.kinds import JobStatus
from app.db.models import Evaluation, TuningJob, utcnow
from app.db.session import session_scope
from app.errors import DomainError
from app.services.runs import leases
from app.services.runs.leases import Leased
from app.services.runs.turns import TimeSlice

log = logging.getLogger(__name__)
T = TypeVar("T")
Run = TuningJob | Evaluation

# Progress is written, and the cancel flag read, at most this often: a fast run would otherwise spend its
# time in the database.
PROGRESS_INTERVAL_S = 1.0
# How long a finished run keeps trying to write its outcome while the registry database is unreachable.
DATABASE_RETRY_S = 120.0

# Set when this worker process is shutting down (SIGTERM): the running job or evaluation stops at its next
# step or batch, saves where it is and goes back to the queue, instead of the shutdown waiting for it.
HANDBACK = threading.Event()


class RunOutcome(StrEnum):
    """How one delivery of a job or an evaluation to a worker ended."""

    SUCCEEDED = "succeeded"  # a version was published, or the evaluation's results written
    FAILED = "failed"  # the row failed; its error says why
    CANCELLED = "cancelled"  # cancelled by its owner; nothing written
    SKIPPED = "skipped"  # not queued when it arrived: a duplicate delivery, or cancelled before it started
    LOST = "lost"  # its lease went to another worker mid-run; this run wrote nothing
    HANDED_BACK = "handed_back"  # the worker shut down mid-run: queued again, its state saved
    YIELDED = "yielded"  # its time slice ended with another tenant's run waiting: queued again, state saved
    MISSING = "missing"  # no such row (deleted with its tenant)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def retrying(write: Callable[[], T]) -> T:
    """``write`` again while the database is unreachable, up to DATABASE_RETRY_S: a finished run is too
    costly to lose to a short outage, and a claimed one should not fail for one before it starts. Each try
    is one transaction, so a failed one left nothing."""
    deadline, delay = time.monotonic() + DATABASE_RETRY_S, 0.5
    while True:
        try:
            return write()
        except OperationalError as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("registry database unreachable (%s); trying again in %.1f s", error, delay)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


@dataclass
class RunOwner:
    """This worker's hold on a row: every write that ends the run first checks the row still names it."""

    db_url: str
    kind: Leased
    row_id: int
    worker: str

    def row(self, session: Session) -> Run | None:
        """The row, locked, or None once this worker no longer holds it."""
        row = session.get(self.kind.table, self.row_id, with_for_update=True)
        held = row is not None and row.status == JobStatus.RUNNING and row.worker == self.worker
        return row if held else None

    def end(self, ending: Callable[[Session, Run], RunOutcome]) -> RunOutcome:
        """``ending`` written in one transaction while this worker holds the row; LOST, writing nothing,
        once it does not."""
        with session_scope(self.db_url) as session:
            row = self.row(session)
            if row is None:
                log.warning(
                    "%s %s: the lease went to another worker; this run writes nothing",
                    self.kind.noun,
                    self.row_id,
                )
                return RunOutcome.LOST
            return ending(session, row)

    def fail(self, *, code: str, message: str) -> RunOutcome:
        return self.end(lambda session, row: failed(session, self.kind, row, code=code, message=message))


def failed(session: Session, kind: Leased, row: Run, *, code: str, message: str) -> RunOutcome:
    """The row ends failed, saying why; what it kept between attempts goes."""
    row.status, row.finished_at = JobStatus.FAILED, utcnow()
    row.error_code, row.error_message = code, message
    kind.discard(session, row.id)
    kind.record(session, row, type="error", message=message, data={"status": JobStatus.FAILED, "code": code})
    return RunOutcome.FAILED


def requeue(row: Run, *, yielded: bool) -> RunOutcome:
    """Back to the queue, not counted as an attempt (its state is the caller's to save): the worker is
    shutting down, or the run ``yielded`` its time slice. The reaper sends it again at its next pass: a
    worker that is shutting down does not talk to the broker."""
    row.status, row.worker, row.attempts = JobStatus.QUEUED, None, row.attempts - 1
    row.lease_expires_at = utcnow()
    return RunOutcome.YIELDED if yielded else RunOutcome.HANDED_BACK


class RunWatch:
    """What a running body asks between its steps: whether progress is due, whether to stop (the lease
    lost, the worker shutting down, the time slice spent, a cancel asked for). While the database is
    unreachable the run goes on: progress is not written and the cancel flag keeps its last value."""

    def __init__(self, owner: RunOwner, *, lost: threading.Event, turn: TimeSlice):
        self.owner, self.lost, self.turn = owner, lost, turn
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False

    def progress_due(self, *, last: bool = False) -> bool:
        """True at most once per PROGRESS_INTERVAL_S (and always for the ``last`` progress), never once the
        lease is lost: the row is another worker's then."""
        now = time.monotonic()
        if self.lost.is_set() or (now - self._last_progress < PROGRESS_INTERVAL_S and not last):
            return False
        self._last_progress = now
        return True

    def write(self, change: Callable[[Session, Run], None]) -> None:
        """``change`` to the row in a transaction of its own; skipped, with a warning, while the database
        is unreachable."""
        try:
            with session_scope(self.owner.db_url) as session:
                change(session, session.get(self.owner.kind.table, self.owner.row_id))
        except OperationalError as error:
            log.warning("%s %s: registry unreachable: %s", self.owner.kind.noun, self.owner.row_id, error)

    def cancel_requested(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= PROGRESS_INTERVAL_S:
            self._last_cancel_check = now
            self.write(lambda session, row: setattr(self, "_cancelled", bool(row.cancel_requested)))
        return self._cancelled

    def should_stop(self) -> bool:
        return self.lost.is_set() or HANDBACK.is_set() or self.turn.spent() or self.cancel_requested()


def run_leased(
    kind: Leased,
    *,
    db_url: str,
    row_id: int,
    lease_s: float,
    body: Callable[[RunOwner, threading.Event], RunOutcome],
    error_code: str,
) -> RunOutcome:
    """Runs ``body`` (given the owner and the event set when the lease is lost) if this call wins the
    claim, under a heartbeat. A DomainError fails the row with its code; anything else with
    ``error_code``: a failed run must say why, whatever broke."""
    worker, noun = worker_name(), kind.noun
    if not leases.claim(db_url=db_url, job_id=row_id, worker=worker, lease_s=lease_s, kind=kind):
        log.info("%s %s not claimed: it is not queued (duplicate delivery or cancelled)", noun, row_id)
        return RunOutcome.SKIPPED
    log.info("%s %s claimed by %s", noun, row_id, worker)
    owner = RunOwner(db_url=db_url, kind=kind, row_id=row_id, worker=worker)
    with leases.Heartbeat(db_url=db_url, job_id=row_id, worker=worker, lease_s=lease_s, kind=kind) as beat:
        try:
            outcome = body(owner, beat.lost)
        except DomainError as error:
            outcome = owner.fail(code=error.code, message=error.message)
        except Exception as error:
            log.exception("%s %s failed", noun, row_id)
            outcome = owner.fail(code=error_code, message=f"{type(error).__name__}: {error}")
    log.info("%s %s released by %s: %s", noun, row_id, worker, outcome)
    return outcome


def refuse(kind: Leased, *, db_url: str, row_id: int, error: DomainError, lease_s: float) -> RunOutcome:
    """Fail a queued row that no worker can run (its backbone cannot be loaded), saying why; a row that is
    no longer queued is left as it is."""
    worker = worker_name()
    if not leases.claim(db_url=db_url, job_id=row_id, worker=worker, lease_s=lease_s, kind=kind):
        return RunOutcome.SKIPPED
    log.error("%s %s refused: %s", kind.noun, row_id, error.message)
    return RunOwner(db_url=db_url, kind=kind, row_id=row_id, worker=worker).fail(
        code=error.code, message=error.message
    )
