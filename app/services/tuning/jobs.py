"""Tuning jobs: creation with defaults, the state machine, events. The row is the truth about a job."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.contract.hyperparameters import DEFAULT_METHOD, METHOD_DEFAULTS, Hyperparameters
from app.contract.kinds import (
    FINISHED_STATUSES,
    DatasetKind,
    InitStrategy,
    JobStatus,
    Method,
    check_init,
    default_init,
)
from app.contract.templates import DEFAULT_TEMPLATE
from app.db.models import Dataset, JobEvent, PromptVersion, TuningJob, utcnow
from app.errors import Conflict, DomainError, InvalidRequest, NotFound
from app.services.datasets.datasets import get_dataset, lock_datasets
from app.services.pagination import paginate
from app.services.registry.prompts import check_task_name, check_template, get_version, parse_task_ref
from app.services.runs import metadata as run_metadata
from app.services.runs.queue import enqueue_training, send_committed
from app.services.tenancy import idempotency, quotas
from app.services.tenancy.tenants import Caller
from app.services.tuning import checkpoints

log = logging.getLogger(__name__)

# Held out for validation when the job names no validation dataset.
HOLDOUT_FRACTION = 0.1
HOLDOUT_MAX = 200
HOLDOUT_MIN_EXAMPLES = 20


@dataclass(frozen=True)
class JobRequest:
    task: str
    training_dataset: int
    validation_dataset: int | None
    base_model: str | None
    num_virtual_tokens: int | None  # None: the start version's, else the method's default
    template: str | None  # None: the start version's, else DEFAULT_TEMPLATE
    init: dict[str, Any] | None  # InitSpec.stored()
    hyperparameters: Hyperparameters  # as given; the job stores them resolved
    method: Method | None = DEFAULT_METHOD  # None: the start version's, else DEFAULT_METHOD
    metadata: dict[str, str] | None = None

    def fingerprint(self) -> str:
        fields = {**self.__dict__, "hyperparameters": self.hyperparameters.given()}
        # As requests were hashed before there were methods and metadata: their retries match.
        if self.method == Method.PROMPT:
            del fields["method"]
        if self.metadata is None:
            del fields["metadata"]
        return idempotency.fingerprint(fields)


def submit_job(
    session: Session, *, caller: Caller, request: JobRequest, settings: Settings, idempotency_key: str | None
) -> tuple[TuningJob, bool]:
    """``create_job``, committed, then sent to the workers: after the commit, so a worker always finds the
    row. A repeated request sends its job again if it is still queued; a second delivery is harmless."""
    job, created = create_job(
        session, caller=caller, request=request, settings=settings, idempotency_key=idempotency_key
    )
    session.commit()
    if job.status == JobStatus.QUEUED:
        send_committed(settings, enqueue_training, noun="job", id_=job.id)
    return job, created


def create_job(
    session: Session, *, caller: Caller, request: JobRequest, settings: Settings, idempotency_key: str | None
) -> tuple[TuningJob, bool]:
    """The new job and True, or the job an earlier request with the same key created and False."""
    existing = idempotency.earlier(
        session,
        TuningJob,
        tenant_id=caller.tenant_id,
        key=idempotency_key,
        request_sha256=request.fingerprint(),
    )
    if existing is not None:
        return existing, False
    fields = _validated_fields(session, tenant_id=caller.tenant_id, request=request, settings=settings)
    quotas.check_active_jobs(session, caller=caller)
    job = TuningJob(
        tenant_id=caller.tenant_id,
        **fields,
        idempotency_key=idempotency_key or None,
        request_sha256=request.fingerprint(),
        # While queued, the lease says when to send the message again if no worker has claimed it.
        lease_expires_at=utcnow() + timedelta(seconds=settings.job_resend_after_s),
    )
    job, created = idempotency.insert(session, job)
    if created:
        run_metadata.keep(session, job, request.metadata)
        add_event(session, job=job, type="status", message="Job queued.", data={"status": JobStatus.QUEUED})
    return job, created


def _validated_fields(
    session: Session, *, tenant_id: int, request: JobRequest, settings: Settings
) -> dict[str, Any]:
    """The job's columns from a request, each checked: 422 naming the first field that is wrong."""
    _check_given_shape(request, settings)
    lock_datasets(session, tenant_id=tenant_id)
    training, validation = _datasets(session, tenant_id=tenant_id, request=request)
    source = _start_version(session, tenant_id=tenant_id, request=request, settings=settings)
    shape = _Shape.of(request, source, settings)
    init = _validated_init(request.init, kind=training.kind, method=shape.method, source=source)
    holdout = 0 if validation is not None else holdout_size(training.num_examples)
    hyperparameters = request.hyperparameters.resolve(
        training.num_examples - holdout,
        max_steps=settings.max_steps,
        method=shape.method,
        classification=training.kind == DatasetKind.CLASSIFICATION,
    )
    _check_work(training, hyperparameters, virtual_tokens=shape.virtual_tokens, settings=settings)
    return {
        "task": request.task,
        "training_dataset_id": training.id,
        "validation_dataset_id": validation.id if validation else None,
        "base_model": shape.base_model,
        "method": shape.method,
        "num_virtual_tokens": shape.virtual_tokens,
        "template": shape.template,
        "init": init,
        "hyperparameters": hyperparameters.stored(),
        "progress": {"step": 0, "total_steps": hyperparameters.steps, "eta_seconds": None},
    }


def _check_given_shape(request: JobRequest, settings: Settings) -> None:
    """What the request says without reading anything: the task's name, and the backbone, the template
    and the number of virtual tokens where it names them."""
    check_task_name(request.task)
    if request.base_model is not None and request.base_model not in settings.backbones:
        raise InvalidRequest(
            f"Unknown base_model {request.base_model!r}; this service has: "
            f"{', '.join(sorted(settings.backbones))}.",
            param="base_model",
        )
    if request.template is not None:
        check_template(request.template, max_chars=settings.max_template_chars)
    given = request.num_virtual_tokens
    if given is not None and not 1 <= given <= settings.max_virtual_tokens:
        raise InvalidRequest(
            f"num_virtual_tokens must be between 1 and {settings.max_virtual_tokens}; got {given}.",
            param="num_virtual_tokens",
        )


@dataclass(frozen=True)
class _Shape:
    """What the job's soft prompt is: as the request names it, else as its start version is, else the
    defaults."""

    base_model: str
    method: Method
    virtual_tokens: int
    template: str

    @classmethod
    def of(cls, request: JobRequest, source: PromptVersion | None, settings: Settings) -> _Shape:
        if source is None:
            method = request.method or DEFAULT_METHOD
            return cls(
                base_model=request.base_model or settings.default_backbone,
                method=method,
                virtual_tokens=request.num_virtual_tokens or METHOD_DEFAULTS[method].num_virtual_tokens,
                template=request.template if request.template is not None else DEFAULT_TEMPLATE,
            )
        ref = f"{request.init['from']!r}"
        for field, given, theirs in (
            ("base_model", request.base_model, source.base_model),
            ("method", request.method, source.method),
            ("num_virtual_tokens", request.num_virtual_tokens, source.num_virtual_tokens),
        ):
            if given is not None and given != theirs:
                raise InvalidRequest(
                    f"{field} is {given!r} but the start version {ref} has {theirs!r}; a job started from a "
                    f"version keeps its {field} (leave {field} out to take it).",
                    param=field,
                )
        return cls(
            base_model=source.base_model,
            method=Method(source.method),
            virtual_tokens=source.num_virtual_tokens,
            template=request.template if request.template is not None else source.template,
        )


def _start_version(
    session: Session, *, tenant_id: int, request: JobRequest, settings: Settings
) -> PromptVersion | None:
    """The version a job starts from (init strategy "version"), one of the caller's own: another tenant's
    is not found, as everywhere. None for any other start."""
    init = request.init or {}
    if init.get("strategy") != InitStrategy.VERSION or not isinstance(init.get("from"), str):
        return None  # _validated_init says what is wrong with it
    try:
        name, number = parse_task_ref(init["from"])
        source = get_version(session, tenant_id=tenant_id, name=name, version=number)
    except DomainError as error:  # not a task reference, or no such version of the caller's
        error.message, error.param = f"init.from: {error.message}", "init.from"
        raise
    if source.base_model not in settings.backbones:
        raise InvalidRequest(
            f"init.from {init['from']!r} was tuned on {source.base_model!r}, which this service no longer "
            "serves.",
            param="init.from",
        )
    return source


def _datasets(session: Session, *, tenant_id: int, request: JobRequest) -> tuple[Dataset, Dataset | None]:
    """The training dataset, trainable, and the validation dataset if named, of the same kind."""
    training = get_dataset(
        session, tenant_id=tenant_id, dataset_id=request.training_dataset, param="training_dataset"
    )
    _check_trainable(training, param="training_dataset")
    if request.validation_dataset is None:
        return training, None
    validation = get_dataset(
        session, tenant_id=tenant_id, dataset_id=request.validation_dataset, param="validation_dataset"
    )
    if validation.kind != training.kind:
        raise InvalidRequest(
            f"validation_dataset is a {validation.kind} dataset but training_dataset is "
            f"a {training.kind} dataset.",
            param="validation_dataset",
        )
    return training, validation


def _check_work(
    dataset: Dataset, hyperparameters: Hyperparameters, *, virtual_tokens: int, settings: Settings
) -> None:
    """A job's work, counted before it is accepted: steps x batch size x the tokens of one example."""
    per_example = example_tokens(dataset) + virtual_tokens
    work = hyperparameters.steps * hyperparameters.batch_size * per_example
    if work > settings.max_job_train_tokens:
        raise InvalidRequest(
            f"This job would train on about {work:,} tokens ({hyperparameters.steps} steps x batch size "
            f"{hyperparameters.batch_size} x {per_example} tokens per example, with the virtual tokens); "
            f"a job may train on at most {settings.max_job_train_tokens:,} "
            "(SOFTPROMPT_MAX_JOB_TRAIN_TOKENS). Use fewer steps or a smaller batch.",
            param="hyperparameters.steps",
            code="too_much_work",
        )


def example_tokens(dataset: Dataset) -> int:
    """The mean tokens of one example (input and output), from the statistics stored with the dataset;
    their mean characters where it has no token statistics (a token is at least one character)."""
    stats = dataset.stats or {}
    total = 0.0
    for side in ("input", "output"):
        counted = stats.get(f"{side}_tokens") or stats.get(f"{side}_chars") or {}
        total += float(counted.get("mean", 0.0))
    return max(1, math.ceil(total))


def _check_trainable(dataset: Dataset, *, param: str) -> None:
    if dataset.kind == DatasetKind.REFERENCES:
        raise InvalidRequest(
            f"Dataset {dataset.id} holds input and references records, a test set for evaluations; a job "
            'trains on {"text", "label"} or {"input", "output"} records.',
            param=param,
            code="dataset_not_trainable",
        )


def holdout_size(num_examples: int) -> int:
    if num_examples < HOLDOUT_MIN_EXAMPLES:
        return 0
    return min(HOLDOUT_MAX, max(1, int(num_examples * HOLDOUT_FRACTION)))


def _validated_init(
    init: dict[str, Any] | None, *, kind: DatasetKind, method: Method, source: PromptVersion | None
) -> dict[str, Any]:
    """As the job stores it; a start version by its number ('sst2' becomes 'sst2@3')."""
    if not init:
        return {"strategy": default_init(kind)}
    strategy = check_init(
        method, init.get("strategy"), kind=kind, text=init.get("text"), source=init.get("from")
    )
    if strategy == InitStrategy.TEXT:
        return {"strategy": strategy, "text": init["text"]}
    if strategy == InitStrategy.VERSION:
        return {"strategy": strategy, "from": f"{source.task.name}@{source.version}"}
    return {"strategy": strategy}


def get_job(session: Session, *, tenant_id: int, job_id: int) -> TuningJob:
    """Another tenant's job is not found, in the same words as one that never existed."""
    job = session.get(TuningJob, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"No tuning job with id {job_id}.")
    return job


def list_jobs(
    session: Session, *, tenant_id: int, limit: int, after: int | None, metadata: dict[str, str] | None = None
) -> tuple[list[TuningJob], bool]:
    """The tenant's jobs, newest first; with ``metadata``, those whose metadata holds all its pairs."""
    query = run_metadata.matching(
        select(TuningJob).where(TuningJob.tenant_id == tenant_id), TuningJob, metadata or {}
    )
    return paginate(session, query, id_column=TuningJob.id, limit=limit, after=after)


def cancel_job(session: Session, *, tenant_id: int, job_id: int) -> TuningJob:
    """A queued job is cancelled at once; a running one is asked to stop and its worker records it."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job.status in FINISHED_STATUSES:
        raise Conflict(
            f"Job {job_id} already {job.status}; only queued or running jobs can be cancelled.",
            code="job_finished",
        )
    cancelled = session.execute(
        update(TuningJob)
        .where(TuningJob.id == job_id, TuningJob.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=utcnow(), cancel_requested=True)
    ).rowcount
    if cancelled:
        checkpoints.discard(session, job_id=job_id)  # a job handed back keeps one while queued
        add_event(
            session,
            job=job,
            type="status",
            message="Job cancelled before it started.",
            data={"status": JobStatus.CANCELLED},
        )
    else:
        job.cancel_requested = True
        add_event(session, job=job, type="status", message="Cancellation requested.", data={})
    session.flush()
    session.refresh(job)
    return job


def list_events(session: Session, *, tenant_id: int, job_id: int, after: int | None = None) -> list[JobEvent]:
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    return list(session.scalars(query.order_by(JobEvent.id)))


def add_event(session: Session, *, job: TuningJob, type: str, message: str, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job.id, type=type, message=message, data=data))
