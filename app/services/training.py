"""Running one tuning job on a worker: claim it, train, and publish exactly one version, or record why not.

Each database touch is its own short transaction so the API sees progress live and a crash mid-training
leaves the job's last reported state behind."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from sqlalchemy.exc import OperationalError

from app.db.models import JobStatus, TuningJob, utcnow
from app.db.session import session_scope
from app.errors import DomainError, NotFound
from app.ml.backbone import Backbone
from app.ml.checkpoint import Checkpoint
from app.ml.method import Method
from app.ml.prefix import init_prefix
from app.ml.prompt_check import prompt_fault
from app.ml.selection import bare_key, tuned_key
from app.ml.soft_prompt import init_prompt, prompt_to_bytes
from app.ml.trainer import Example, Progress, TrainResult, train_prompt
from app.services import checkpoints, leases, worker_metrics
from app.services import jobs as jobs_service
from app.services.datasets import get_dataset, load_records
from app.services.hyperparameters import Hyperparameters
from app.services.prompts import publish_version
from app.services.turns import TimeSlice

log = logging.getLogger(__name__)
T = TypeVar("T")

# Progress is written at most this often; a fast job would otherwise spend its time in the database.
PROGRESS_INTERVAL_S = 1.0
CANCEL_POLL_INTERVAL_S = 1.0


class RunOutcome(StrEnum):
    """How one delivery of a job to a worker ended."""

    SUCCEEDED = "succeeded"  # a version was published
    FAILED = "failed"  # the job failed; its error says why
    CANCELLED = "cancelled"  # cancelled by its owner; no version written
    SKIPPED = "skipped"  # not queued when it arrived: a duplicate delivery, or cancelled before it started
    LOST = "lost"  # its lease went to another worker mid-run; this run wrote nothing
    HANDED_BACK = "handed_back"  # the worker shut down mid-run: queued again, its state saved
    YIELDED = "yielded"  # its time slice ended with another tenant's run waiting: queued again, state saved
    MISSING = "missing"  # no such job (deleted with its tenant)


@dataclass
class JobInputs:
    kind: str
    labels: list[str] | None
    train: list[Example]
    validation: list[Example]
    resume: Checkpoint | None  # the state a worker that ran the job before saved, if any


def run_job(
    *,
    db_url: str,
    job_id: int,
    backbone: Backbone,
    checkpoint_every: int = 0,
    lease_s: float = 60.0,
    time_slice_s: float = 0.0,
) -> RunOutcome:
    """Runs the job if this call wins the claim. Returns how the run ended (RunOutcome).

    The run's state is saved in the registry every ``checkpoint_every`` steps (0: only at a hand-back),
    and a job that finds a checkpoint of its own continues from it (a job handed back, or queued again
    after its worker died); the checkpoint goes once the job ends. After ``time_slice_s`` (0: never) the
    job yields its worker to another tenant's waiting run (app/services/turns.py)."""
    worker = worker_name()
    if not leases.claim(db_url=db_url, job_id=job_id, worker=worker, lease_s=lease_s):
        log.info("job %s not claimed: it is not queued (duplicate delivery or cancelled)", job_id)
        return RunOutcome.SKIPPED
    log.info("job %s claimed by %s", job_id, worker)
    owner = _Owner(db_url=db_url, job_id=job_id, worker=worker)
    status = RunOutcome.FAILED
    with leases.Heartbeat(db_url=db_url, job_id=job_id, worker=worker, lease_s=lease_s) as heartbeat:
        try:
            # Claimed, so no other worker will take it: wait out a database that is briefly away rather
            # than fail a job that has not started.
            inputs, job = retrying(lambda: _load_inputs(db_url=db_url, job_id=job_id))
            turn = TimeSlice(db_url=db_url, tenant_id=job.tenant_id, seconds=time_slice_s)
            status = _train_and_publish(
                owner=owner,
                job=job,
                inputs=inputs,
                backbone=backbone,
                checkpoint_every=checkpoint_every,
                lost=heartbeat.lost,
                turn=turn,
            )
        except DomainError as error:
            status = owner.fail(code=error.code, message=error.message)
        except Exception as error:  # a failed job must say why, whatever broke
            log.exception("job %s failed", job_id)
            status = owner.fail(code="training_error", message=f"{type(error).__name__}: {error}")
    log.info("job %s released by %s: %s", job_id, worker, status)
    return status


def refuse_job(*, db_url: str, job_id: int, error: DomainError, lease_s: float = 60.0) -> RunOutcome:
    """Fail a queued job that no worker can run (its backbone cannot be loaded), saying why; a job that
    is no longer queued is left as it is."""
    worker = worker_name()
    if not leases.claim(db_url=db_url, job_id=job_id, worker=worker, lease_s=lease_s):
        return RunOutcome.SKIPPED
    log.error("job %s refused: %s", job_id, error.message)
    _Owner(db_url=db_url, job_id=job_id, worker=worker).fail(code=error.code, message=error.message)
    return RunOutcome.FAILED


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


# Set when this worker process is shutting down (SIGTERM): the running job stops at its next step, saves
# where it is and goes back to the queue, instead of the shutdown waiting for the whole job.
HANDBACK = threading.Event()


def _load_inputs(*, db_url: str, job_id: int) -> tuple[JobInputs, TuningJob]:
    with session_scope(db_url) as session:
        job = session.get(TuningJob, job_id)
        if job is None:
            raise NotFound(f"No tuning job with id {job_id}.")
        if job.training_dataset_id is None:
            raise DomainError("The training dataset was deleted.", code="dataset_missing")
        owned = {"tenant_id": job.tenant_id}
        train_records = load_records(session, **owned, dataset_id=job.training_dataset_id)
        dataset = get_dataset(session, **owned, dataset_id=job.training_dataset_id)
        kind, labels = dataset.kind, dataset.labels
        if job.validation_dataset_id is not None:
            validation_records = load_records(session, **owned, dataset_id=job.validation_dataset_id)
        else:
            seed = Hyperparameters.model_validate(job.hyperparameters).seed
            train_records, validation_records = split_holdout(train_records, seed=seed)
        resume = checkpoints.load(session, job_id=job_id)
        if resume is not None:
            jobs_service.add_event(
                session,
                job=job,
                type="status",
                message=f"Resuming from the checkpoint after step {resume.step}.",
                data={"status": JobStatus.RUNNING, "resumed_from_step": resume.step},
            )
        session.flush()
        session.expunge(job)
    inputs = JobInputs(
        kind=kind,
        labels=labels,
        train=[Example(input=i, output=o) for i, o in train_records],
        validation=[Example(input=i, output=o) for i, o in validation_records],
        resume=resume,
    )
    return inputs, job


def split_holdout(records: list, *, seed: int) -> tuple[list, list]:
    size = jobs_service.holdout_size(len(records))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


def _train_and_publish(
    *,
    owner: _Owner,
    job: TuningJob,
    inputs: JobInputs,
    backbone: Backbone,
    checkpoint_every: int,
    lost: threading.Event,
    turn: TimeSlice,
) -> RunOutcome:
    hp = Hyperparameters.model_validate(job.hyperparameters)
    start = init_prefix if job.method == Method.PREFIX else init_prompt
    prompt = start(
        backbone,
        num_virtual_tokens=job.num_virtual_tokens,
        strategy=job.init["strategy"],
        text=job.init.get("text"),
        labels=inputs.labels,
        seed=hp.seed,
    )
    config = hp.train_config(
        classification=inputs.kind == "classification", checkpoint_every=checkpoint_every
    )
    db_url = owner.db_url
    reporter = _Reporter(db_url=db_url, job_id=job.id, lost=lost)
    result = train_prompt(
        backbone,
        prompt=prompt,
        train=inputs.train,
        validation=inputs.validation,
        template=job.template,
        labels=inputs.labels,
        config=config,
        on_progress=reporter.progress,
        should_stop=lambda: lost.is_set() or HANDBACK.is_set() or reporter.cancel_requested() or turn.spent(),
        resume=inputs.resume,
        on_checkpoint=lambda state: checkpoints.save_if_held(
            db_url=db_url, job_id=job.id, worker=owner.worker, checkpoint=state
        ),
    )
    # Checked before the transaction that publishes: it runs the backbone.
    fault = None if result.stopped else prompt_fault(backbone, result.prompt)
    return retrying(
        lambda: _record_outcome(
            owner, result, inputs=inputs, backbone=backbone, fault=fault, yielded=turn.yielded
        )
    )


def _record_outcome(
    owner: _Owner,
    result: TrainResult,
    *,
    inputs: JobInputs,
    backbone: Backbone,
    fault: str | None,
    yielded: bool = False,
) -> RunOutcome:
    """One transaction: the version and the job's end, or the hand-back, or nothing if the job is lost."""
    metrics = result.metrics
    with session_scope(owner.db_url) as session:
        row = owner.row(session)
        if row is None:
            log.warning("job %s: the lease went to another worker; this run writes nothing", owner.job_id)
            return RunOutcome.LOST
        if result.stopped and (HANDBACK.is_set() or yielded) and not row.cancel_requested:
            return _hand_back(session, row, result.state, yielded=yielded and not HANDBACK.is_set())
        checkpoints.discard(session, job_id=row.id)  # the job ends here, one way or the other
        if result.stopped or row.cancel_requested:
            row.status, row.finished_at = JobStatus.CANCELLED, utcnow()
            jobs_service.add_event(
                session,
                job=row,
                type="status",
                message="Job cancelled; no version written.",
                data={"status": JobStatus.CANCELLED, "step": result.steps_done},
            )
            return RunOutcome.CANCELLED
        if fault is not None:  # what no version may be: unsafe beside other tenants' rows
            row.metrics = metrics
            message = f"The trained soft prompt {fault}; no version was published. Lower the learning rate."
            return _failed(session, row, code="unusable_prompt", message=message)
        if result.versus_bare is not None and result.versus_bare.worse:
            row.metrics = metrics  # both scores and the test, for the client to see why
            return _failed(session, row, code="below_zero_shot", message=_below_zero_shot(result))
        version = publish_version(
            session,
            job=row,
            vectors=prompt_to_bytes(result.prompt),
            embedding_dim=backbone.embedding_dim,
            kind=inputs.kind,
            labels=inputs.labels,
            metrics=metrics,
        )
        row.status, row.finished_at, row.metrics = JobStatus.SUCCEEDED, utcnow(), metrics
        row.result_version = version.version
        row.progress = {**row.progress, "step": result.steps_done, "eta_seconds": 0}
        jobs_service.add_event(session, job=row, type="metrics", message="Evaluation finished.", data=metrics)
        jobs_service.add_event(
            session,
            job=row,
            type="status",
            message=f"Job succeeded: {row.task}@{version.version}.",
            data={"status": JobStatus.SUCCEEDED, "task": row.task, "version": version.version},
        )
    return RunOutcome.SUCCEEDED


def _below_zero_shot(result: TrainResult) -> str:
    verdict = result.versus_bare
    metric = verdict.metric
    tuned, bare = result.metrics[tuned_key(metric)], result.metrics[bare_key(metric)]
    return (
        f"The best soft prompt this job found scored {metric.value} {tuned:.3f} on the hold-out, worse than "
        f"the template alone on the bare backbone ({bare:.3f}) beyond the hold-out's noise: "
        f"{verdict.reason()}; so no version was published. Serve the template with task null, or train "
        "longer, with more data or another learning rate."
    )


# How long a finished run keeps trying to write its outcome while the registry database is unreachable.
DATABASE_RETRY_S = 120.0


def retrying(write: Callable[[], T]) -> T:
    """``write`` again while the database is unreachable, up to DATABASE_RETRY_S: a finished training run
    is too costly to lose to a short outage, and a claimed job should not fail for one before it starts.
    Each try is one transaction, so a failed one left nothing."""
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


def _hand_back(session, row: TuningJob, state: Checkpoint, *, yielded: bool) -> RunOutcome:
    """Back to the queue with its state saved, not counted as an attempt: the worker is shutting down, or
    the job's time slice ended with another tenant's run waiting (``yielded``). The reaper sends it again
    at its next pass: a worker that is shutting down does not talk to the broker."""
    checkpoints.save(session, job_id=row.id, checkpoint=state)
    row.status, row.worker, row.attempts = JobStatus.QUEUED, None, row.attempts - 1
    row.lease_expires_at = utcnow()
    why = (
        "Its time slice ended with another tenant's run waiting" if yielded else "The worker is shutting down"
    )
    jobs_service.add_event(
        session,
        job=row,
        type="status",
        message=f"{why}; the job goes back to the queue after step {state.step}.",
        data={"status": JobStatus.QUEUED, "step": state.step, "yielded": yielded},
    )
    return RunOutcome.YIELDED if yielded else RunOutcome.HANDED_BACK


@dataclass
class _Owner:
    """This worker's hold on a job: every write that ends the job first checks the row still names it."""

    db_url: str
    job_id: int
    worker: str

    def row(self, session) -> TuningJob | None:
        """The job's row, locked, or None once this worker no longer holds the job."""
        row = session.get(TuningJob, self.job_id, with_for_update=True)
        return (
            row if row is not None and row.status == JobStatus.RUNNING and row.worker == self.worker else None
        )

    def fail(self, *, code: str, message: str) -> RunOutcome:
        with session_scope(self.db_url) as session:
            job = self.row(session)
            if job is None:
                return RunOutcome.LOST
            return _failed(session, job, code=code, message=message)


def _failed(session, job: TuningJob, *, code: str, message: str) -> RunOutcome:
    job.status, job.finished_at = JobStatus.FAILED, utcnow()
    job.error_code, job.error_message = code, message
    checkpoints.discard(session, job_id=job.id)
    jobs_service.add_event(
        session, job=job, type="error", message=message, data={"status": JobStatus.FAILED, "code": code}
    )
    return RunOutcome.FAILED


class _Reporter:
    """Turns trainer callbacks into throttled database writes. While the database is unreachable training
    goes on: progress is not written and the cancel flag keeps its last value."""

    def __init__(self, *, db_url: str, job_id: int, lost: threading.Event):
        self.db_url, self.job_id, self.lost = db_url, job_id, lost
        self._last_progress = 0.0
        self._last_step: tuple[int, float] | None = None  # (step, when): the step-time metric
        self._last_cancel_check = 0.0
        self._cancelled = False

    def progress(self, p: Progress) -> None:
        now = time.monotonic()
        if self._last_step is not None and p.step > self._last_step[0]:
            per_step = (now - self._last_step[1]) / (p.step - self._last_step[0])
            worker_metrics.STEP_SECONDS.observe(per_step)
        self._last_step = (p.step, now)
        if self.lost.is_set():
            return  # the job is another worker's now
        if now - self._last_progress < PROGRESS_INTERVAL_S and p.step not in (1, p.total_steps):
            return
        self._last_progress = now
        progress = {"step": p.step, "total_steps": p.total_steps, "eta_seconds": p.eta_seconds}
        try:
            with session_scope(self.db_url) as session:
                job = session.get(TuningJob, self.job_id)
                job.progress = progress
                job.metrics = {**job.metrics, "train_loss": p.loss}
                jobs_service.add_event(
                    session,
                    job=job,
                    type="progress",
                    message=f"Step {p.step}/{p.total_steps}, loss {p.loss:.4f}.",
                    data={**progress, "loss": p.loss},
                )
        except OperationalError as error:
            log.warning("job %s: progress not written, database unreachable: %s", self.job_id, error)

    def cancel_requested(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= CANCEL_POLL_INTERVAL_S:
            self._last_cancel_check = now
            try:
                with session_scope(self.db_url) as session:
                    self._cancelled = bool(session.get(TuningJob, self.job_id).cancel_requested)
            except OperationalError as error:
                log.warning("job %s: cancel flag not read, database unreachable: %s", self.job_id, error)
        return self._cancelled
