"""Running one tuning job on a worker: claim it, train, and publish exactly one version, or record why not.

Each database touch is its own short transaction so the API sees progress live and a crash mid-training
leaves the job's last reported state behind."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

from app.contract.hyperparameters import Hyperparameters
from app.contract.kinds import DatasetKind, InitStrategy, JobStatus, Method
from app.db.models import TuningJob, utcnow
from app.db.session import session_scope
from app.errors import DomainError, NotFound
from app.ml.backbone import Backbone
from app.ml.checkpoint import Checkpoint
from app.ml.prefix import init_prefix
from app.ml.prompt_check import prompt_fault
from app.ml.selection import bare_key, tuned_key
from app.ml.soft_prompt import init_prompt, prompt_from_bytes, prompt_to_bytes, stored_shape
from app.ml.trainer import Example, Progress, TrainConfig, TrainResult, train_prompt
from app.services.datasets.datasets import get_dataset, load_records
from app.services.registry.prompts import get_version, parse_task_ref, publish_version
from app.services.runs import leases, worker_metrics
from app.services.runs.lifecycle import (
    HANDBACK,
    RunOutcome,
    RunOwner,
    RunWatch,
    failed,
    requeue,
    retrying,
    run_leased,
)
from app.services.runs.turns import TimeSlice
from app.services.tuning import checkpoints
from app.services.tuning import jobs as jobs_service

log = logging.getLogger(__name__)


@dataclass
class JobInputs:
    kind: str
    labels: list[str] | None
    train: list[Example]
    validation: list[Example]
    resume: Checkpoint | None  # the state a worker that ran the job before saved, if any
    start: bytes | None = None  # the stored soft prompt of the version the job starts from, if it does


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
    job yields its worker to another tenant's waiting run (app/services/runs/turns.py)."""

    def body(owner: RunOwner, lost: threading.Event) -> RunOutcome:
        # Claimed, so no other worker will take it: wait out a database that is briefly away rather than
        # fail a job that has not started.
        inputs, job = retrying(lambda: _load_inputs(db_url=db_url, job_id=job_id))
        turn = TimeSlice(db_url=db_url, tenant_id=job.tenant_id, seconds=time_slice_s)
        return _train_and_publish(
            watch=RunWatch(owner, lost=lost, turn=turn),
            job=job,
            inputs=inputs,
            backbone=backbone,
            checkpoint_every=checkpoint_every,
        )

    return run_leased(
        leases.JOBS, db_url=db_url, row_id=job_id, lease_s=lease_s, body=body, error_code="training_error"
    )


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
        start = _start_vectors(session, job) if job.init.get("strategy") == InitStrategy.VERSION else None
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
        start=start,
    )
    return inputs, job


def _start_vectors(session, job: TuningJob) -> bytes:
    """The start version's soft prompt; the job fails, saying so, if that version was deleted after the
    job was queued (the job checked its shape then: versions never change)."""
    name, number = parse_task_ref(job.init["from"])
    try:
        return get_version(
            session, tenant_id=job.tenant_id, name=name, version=number, with_vectors=True
        ).vectors
    except NotFound as error:
        raise DomainError(
            f"The version this job starts from, {job.init['from']}, was deleted before the job ran.",
            code="start_version_missing",
        ) from error


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
    *, watch: RunWatch, job: TuningJob, inputs: JobInputs, backbone: Backbone, checkpoint_every: int
) -> RunOutcome:
    hp = Hyperparameters.model_validate(job.hyperparameters)
    prompt = _start_prompt(job, inputs, backbone, seed=hp.seed)
    config = TrainConfig.of(
        hp, classification=inputs.kind == DatasetKind.CLASSIFICATION, checkpoint_every=checkpoint_every
    )
    owner = watch.owner
    reporter = _Reporter(watch)
    result = train_prompt(
        backbone,
        prompt=prompt,
        train=inputs.train,
        validation=inputs.validation,
        template=job.template,
        labels=inputs.labels,
        config=config,
        on_progress=reporter.progress,
        should_stop=watch.should_stop,
        resume=inputs.resume,
        on_checkpoint=lambda state: checkpoints.save_if_held(
            db_url=owner.db_url, job_id=job.id, worker=owner.worker, checkpoint=state
        ),
    )
    # Checked before the transaction that publishes: it runs the backbone.
    fault = None if result.stopped else prompt_fault(backbone, result.prompt)
    yielded = watch.turn.yielded
    return retrying(
        lambda: owner.end(
            lambda session, row: _record_outcome(
                session, row, result, inputs=inputs, backbone=backbone, fault=fault, yielded=yielded
            )
        )
    )


def _start_prompt(job: TuningJob, inputs: JobInputs, backbone: Backbone, *, seed: int):
    """The soft prompt the job's first step trains: a version's as stored, or one made as init says."""
    if inputs.start is not None:
        return prompt_from_bytes(inputs.start, shape=stored_shape(backbone, Method(job.method)))
    make = init_prefix if job.method == Method.PREFIX else init_prompt
    return make(
        backbone,
        num_virtual_tokens=job.num_virtual_tokens,
        strategy=job.init["strategy"],
        text=job.init.get("text"),
        labels=inputs.labels,
        seed=seed,
    )


def _record_outcome(
    session,
    row: TuningJob,
    result: TrainResult,
    *,
    inputs: JobInputs,
    backbone: Backbone,
    fault: str | None,
    yielded: bool = False,
) -> RunOutcome:
    """In the owner's transaction: the version and the job's end, or the hand-back."""
    metrics = result.metrics
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
        return failed(session, leases.JOBS, row, code="unusable_prompt", message=message)
    if result.versus_bare is not None and result.versus_bare.worse:
        row.metrics = metrics  # both scores and the test, for the client to see why
        return failed(session, leases.JOBS, row, code="below_zero_shot", message=_below_zero_shot(result))
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


def _hand_back(session, row: TuningJob, state: Checkpoint, *, yielded: bool) -> RunOutcome:
    """Back to the queue with its state saved, not counted as an attempt: the worker is shutting down, or
    the job's time slice ended with another tenant's run waiting (``yielded``). The reaper sends it again
    at its next pass: a worker that is shutting down does not talk to the broker."""
    checkpoints.save(session, job_id=row.id, checkpoint=state)
    outcome = requeue(row, yielded=yielded)
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
    return outcome


class _Reporter:
    """Trainer callbacks as throttled writes (RunWatch, app/services/runs/lifecycle.py): the job's
    progress and an event, and the step time metric."""

    def __init__(self, watch: RunWatch):
        self.watch = watch
        self._last_step: tuple[int, float] | None = None  # (step, when): the step-time metric

    def progress(self, p: Progress) -> None:
        now = time.monotonic()
        if self._last_step is not None and p.step > self._last_step[0]:
            per_step = (now - self._last_step[1]) / (p.step - self._last_step[0])
            worker_metrics.STEP_SECONDS.observe(per_step)
        self._last_step = (p.step, now)
        if not self.watch.progress_due(last=p.step in (1, p.total_steps)):
            return
        progress = {"step": p.step, "total_steps": p.total_steps, "eta_seconds": p.eta_seconds}

        def write(session, job: TuningJob) -> None:
            job.progress = progress
            job.metrics = {**job.metrics, "train_loss": p.loss}
            jobs_service.add_event(
                session,
                job=job,
                type="progress",
                message=f"Step {p.step}/{p.total_steps}, loss {p.loss:.4f}.",
                data={**progress, "loss": p.loss},
            )

        self.watch.write(write)
