"""Where a running job's checkpoint lives: a row of the registry database, the one store every worker
shares already. A worker on another machine, with a data directory of its own, resumes a job another
worker started. Only the worker that holds the job's lease may write its checkpoint."""

from __future__ import annotations

import logging

from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.contract.kinds import JobStatus
from app.db.models import JobCheckpoint, TuningJob, utcnow
from app.db.session import session_scope
from app.ml.checkpoint import Checkpoint, checkpoint_from_bytes, checkpoint_to_bytes

log = logging.getLogger(__name__)


def save(session: Session, *, job_id: int, checkpoint: Checkpoint) -> None:
    """Write (or replace) the job's checkpoint; the caller holds the job and owns the transaction."""
    data = checkpoint_to_bytes(checkpoint)
    row = session.get(JobCheckpoint, job_id)
    if row is None:
        session.add(JobCheckpoint(job_id=job_id, step=checkpoint.step, data=data))
    else:
        row.step, row.data, row.updated_at = checkpoint.step, data, utcnow()


def save_if_held(*, db_url: str, job_id: int, worker: str, checkpoint: Checkpoint) -> bool:
    """Save, if ``worker`` still holds the job (a worker that lost its lease must not overwrite the new
    owner's state). The database away costs this checkpoint, not the run: False, and training goes on."""
    try:
        with session_scope(db_url) as session:
            job = session.get(TuningJob, job_id, with_for_update=True)
            if job is None or job.status != JobStatus.RUNNING or job.worker != worker:
                return False
            save(session, job_id=job_id, checkpoint=checkpoint)
        return True
    except OperationalError as error:
        log.warning("job %s: checkpoint at step %s not saved: %s", job_id, checkpoint.step, error)
        return False


def load(session: Session, *, job_id: int) -> Checkpoint | None:
    data = session.scalar(select(JobCheckpoint.data).where(JobCheckpoint.job_id == job_id))
    if data is None:
        return None
    try:
        return checkpoint_from_bytes(data)
    except Exception as error:  # an unreadable checkpoint costs the steps it saved, never the job
        log.warning("job %s: checkpoint unreadable (%s); starting over", job_id, error)
        return None


def discard(session: Session, *, job_id: int) -> None:
    """The job ended: its checkpoint has no further use."""
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_id == job_id))
