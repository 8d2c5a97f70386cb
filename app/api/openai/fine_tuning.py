"""/v1/fine_tuning/jobs: the OpenAI shape of /v1/tuning/jobs. A job is prompt or prefix tuning (without a
`method`: the service's default); `suffix` names the task, and the finished model is
ft:<backbone>:<task>:<version>."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query

from app.api.auth import CallerDep
from app.api.deps import LimitQuery, MetadataFilter, SessionDep, SettingsDep
from app.api.openai import ids
from app.api.openai.params import speaking_as
from app.api.openai.schemas import (
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCreate,
    FineTuningJobEvent,
    JobErrorObject,
    ListOf,
    PromptTuning,
)
from app.api.responses import errors
from app.contract.hyperparameters import DEFAULT_METHOD, METHOD_DEFAULTS, Hyperparameters
from app.contract.kinds import InitStrategy, JobStatus
from app.contract.kinds import Method as TuningMethod
from app.db.models import JobEvent, PromptVersion, TuningJob
from app.errors import DomainError, InvalidRequest
from app.services.registry.model_names import fine_tuned_model, missing, task_ref_of_model
from app.services.registry.prompts import find_version, parse_task_ref
from app.services.tuning import jobs as service

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["OpenAI-compatible"])
# Our names for what the client called otherwise, for errors raised by the shared job service.
PARAMS = {
    "task": "suffix",
    "base_model": "model",
    "training_dataset": "training_file",
    "validation_dataset": "validation_file",
    "method": "method.type",
}
# A job's method as OpenAI's `method.type` names it, and back.
TYPES = {TuningMethod.PROMPT: "prompt_tuning", TuningMethod.PREFIX: "prefix_tuning"}
METHODS = {name: method for method, name in TYPES.items()}


@router.post("", response_model=FineTuningJob, responses=errors(401, 404, 409, 422, 429))
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> FineTuningJob:
    """Queue a prompt-tuning job on a base model, or go on training a fine-tuned one
    (ft:<backbone>:<task>:<version>): as OpenAI does, the job starts from that model, and its method and
    template are that version's unless given. The result is a new version of `suffix`, or, without one,
    the next version of the same task."""
    backbone, source = _base(body.model, session, caller.tenant_id, settings)
    training = ids.from_id(ids.FILE, body.training_file, what="file", param="training_file")
    validation = (
        ids.from_id(ids.FILE, body.validation_file, what="file", param="validation_file")
        if body.validation_file is not None
        else None
    )
    if body.method:
        method = METHODS[body.method.type]
    else:  # the fine-tuned model's, as OpenAI keeps a model's method
        method = TuningMethod(source.method) if source else DEFAULT_METHOD
    kind = TYPES[method]
    tuning = body.method.tuning if body.method else PromptTuning()
    if source is not None and tuning.init is not None:
        raise InvalidRequest(
            f"A job on the fine-tuned model {body.model!r} starts from it; leave method.{kind}.init out.",
            param=f"method.{kind}.init",
        )
    init = (
        {"strategy": InitStrategy.VERSION, "from": f"{source.task.name}@{source.version}"} if source else None
    )
    request = service.JobRequest(
        task=body.suffix if body.suffix is not None else source.task.name if source else f"ft-{training}",
        training_dataset=training,
        validation_dataset=validation,
        base_model=backbone,
        num_virtual_tokens=tuning.num_virtual_tokens,
        template=tuning.template,
        init=tuning.init.stored() if tuning.init else init,
        hyperparameters=_hyperparameters(body, tuning.hyperparameters, method),
        method=method,
        metadata=body.metadata,
    )
    settings_fields = ("num_virtual_tokens", "template", "init.strategy", "init.text", "init.from")
    names = {field: f"method.{kind}.{field}" for field in settings_fields}
    with speaking_as(PARAMS | names):
        job, _ = service.submit_job(
            session, caller=caller, request=request, settings=settings, idempotency_key=idempotency_key
        )
    return fine_tuning_job(job, caller.tenant)


def _base(model: str, session, tenant_id: int, settings) -> tuple[str, PromptVersion | None]:
    """(backbone, the version to start from) that a job's `model` names: a base model of this service, or
    one of the caller's fine-tuned models; any other name is a model that does not exist for the caller."""
    backbone, ref = task_ref_of_model(model, set(settings.backbones))
    if backbone is None:
        raise InvalidRequest(
            f"model {model!r} is not a base model of this service or one of your fine-tuned models "
            f"(ft:<backbone>:<task>:<version>); base models: {', '.join(sorted(settings.backbones))}.",
            param="model",
        )
    if ref is None:
        return backbone, None
    if backbone not in settings.backbones:
        raise missing(model)
    try:
        source = find_version(session, tenant_id=tenant_id, ref=ref, with_vectors=False)
    except DomainError as error:  # a name no task has, or no such version of the caller's
        raise missing(model) from error
    if source.base_model != backbone:
        raise missing(model)
    return backbone, source


def _hyperparameters(
    body: FineTuningJobCreate, native: Hyperparameters, method: TuningMethod
) -> Hyperparameters:
    """OpenAI's knobs in our terms; each may be given once, in either place. The learning rate multiplies
    the method's default."""
    given: dict[str, Any] = {}
    openai = body.hyperparameters
    if openai is not None:
        if openai.n_epochs is not None:
            given["epochs"] = openai.n_epochs
        if openai.batch_size is not None:
            given["batch_size"] = openai.batch_size
        if openai.learning_rate_multiplier is not None:
            rate = METHOD_DEFAULTS[method].learning_rate
            given["learning_rate"] = rate * openai.learning_rate_multiplier
    if body.seed is not None:
        given["seed"] = body.seed
    twice = sorted(set(given) & native.model_fields_set)
    if twice:
        raise InvalidRequest(
            f"{twice[0]} is given both at the top level and in "
            f"method.{TYPES[method]}.hyperparameters; give it once.",
            param="hyperparameters",
        )
    return Hyperparameters.of({**native.given(), **given})


@router.get("", response_model=ListOf, responses=errors(401, 404, 422))
def list_fine_tuning_jobs(
    caller: CallerDep,
    session: SessionDep,
    metadata: MetadataFilter,
    limit: LimitQuery = 20,
    after: str | None = None,
) -> ListOf:
    """List your jobs, newest first; `metadata[key]=value` keeps those whose metadata holds every such
    pair, as OpenAI's list does."""
    rows, has_more = service.list_jobs(
        session, tenant_id=caller.tenant_id, limit=limit, after=ids.cursor(ids.JOB, after), metadata=metadata
    )
    return ListOf(data=[fine_tuning_job(r, caller.tenant) for r in rows], has_more=has_more)


def _number(job_id: str) -> int:
    return ids.from_id(ids.JOB, job_id, what="fine-tuning job", param="fine_tuning_job_id")


def _job(session, caller, job_id: str) -> TuningJob:
    return service.get_job(session, tenant_id=caller.tenant_id, job_id=_number(job_id))


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob, responses=errors(401, 404))
def retrieve_fine_tuning_job(
    fine_tuning_job_id: str, caller: CallerDep, session: SessionDep
) -> FineTuningJob:
    """Get a job's status; `fine_tuned_model` is set once it has succeeded."""
    return fine_tuning_job(_job(session, caller, fine_tuning_job_id), caller.tenant)


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob, responses=errors(401, 404, 409))
def cancel_fine_tuning_job(fine_tuning_job_id: str, caller: CallerDep, session: SessionDep) -> FineTuningJob:
    """Cancel a queued or running job."""
    job = service.cancel_job(session, tenant_id=caller.tenant_id, job_id=_number(fine_tuning_job_id))
    return fine_tuning_job(job, caller.tenant)


@router.get("/{fine_tuning_job_id}/events", response_model=ListOf, responses=errors(401, 404, 422))
def list_fine_tuning_events(
    fine_tuning_job_id: str,
    caller: CallerDep,
    session: SessionDep,
    limit: LimitQuery = 20,
    after: Annotated[str | None, Query(description="The last event id of the previous page.")] = None,
) -> ListOf:
    """The job's events, oldest first, so that `after` pages forward as the job goes on."""
    rows = service.list_events(
        session,
        tenant_id=caller.tenant_id,
        job_id=_number(fine_tuning_job_id),
        after=ids.cursor(ids.EVENT, after),
    )
    return ListOf(data=[_event(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=ListOf, responses=errors(401, 404))
def list_fine_tuning_checkpoints(fine_tuning_job_id: str, caller: CallerDep, session: SessionDep) -> ListOf:
    """A succeeded job has one checkpoint: the version it published (its best evaluated step)."""
    job = _job(session, caller, fine_tuning_job_id)
    if job.result_version is None:
        return ListOf(data=[])
    metrics = job.metrics or {}
    checkpoint = FineTuningJobCheckpoint(
        id=ids.to_id(ids.CHECKPOINT, job.id),
        created_at=ids.unix(job.finished_at),
        fine_tuned_model_checkpoint=fine_tuned_model(job.base_model, job.task, job.result_version),
        fine_tuning_job_id=ids.to_id(ids.JOB, job.id),
        step_number=metrics.get("best_step") or job.progress.get("step", 0),
        metrics={
            "step": metrics.get("best_step"),
            "train_loss": metrics.get("train_loss"),
            "valid_loss": metrics.get("val_loss"),
            "full_valid_loss": metrics.get("val_loss"),
        },
    )
    return ListOf(data=[checkpoint])


def fine_tuning_job(row: TuningJob, tenant: str) -> FineTuningJob:
    hp = Hyperparameters.model_validate(row.hyperparameters)
    eta = row.progress.get("eta_seconds")
    return FineTuningJob(
        id=ids.to_id(ids.JOB, row.id),
        created_at=ids.unix(row.created_at),
        finished_at=ids.unix(row.finished_at) if row.finished_at else None,
        # The ETA is the time left at the last progress report, at most a second or so ago.
        estimated_finish=int(time.time() + eta)
        if row.status == JobStatus.RUNNING and eta is not None
        else None,
        model=_model_of(row),
        fine_tuned_model=fine_tuned_model(row.base_model, row.task, row.result_version)
        if row.result_version
        else None,
        organization_id=tenant,
        status=row.status,
        training_file=_file(row.training_dataset_id),
        validation_file=_file(row.validation_dataset_id),
        hyperparameters={
            "n_epochs": _whole(hp.epochs) if hp.epochs is not None else "auto",
            "batch_size": hp.batch_size,
            "learning_rate_multiplier": hp.learning_rate
            / METHOD_DEFAULTS[TuningMethod(row.method)].learning_rate,
        },
        method={
            "type": TYPES[TuningMethod(row.method)],
            TYPES[TuningMethod(row.method)]: {
                "num_virtual_tokens": row.num_virtual_tokens,
                "template": row.template,
                "init": row.init,
                "hyperparameters": row.hyperparameters,
            },
        },
        seed=hp.seed,
        error=JobErrorObject(code=row.error_code, message=row.error_message or "")
        if row.error_code
        else None,
        user_provided_suffix=row.task,
        metadata=row.client_metadata,
    )


def _model_of(row: TuningJob) -> str:
    """What the job tuned: a base model, or the fine-tuned model it started from."""
    if row.init.get("strategy") != InitStrategy.VERSION:
        return row.base_model
    task, version = parse_task_ref(row.init["from"])  # pinned to a number when the job was created
    return fine_tuned_model(row.base_model, task, version)


def _event(row: JobEvent) -> FineTuningJobEvent:
    return FineTuningJobEvent(
        id=ids.to_id(ids.EVENT, row.id),
        created_at=ids.unix(row.created_at),
        level="error" if row.type == "error" else "info",
        message=row.message,
        type="metrics" if row.type in ("progress", "metrics") else "message",
        data=row.data,
    )


def _file(dataset_id: int | None) -> str | None:
    return ids.to_id(ids.FILE, dataset_id) if dataset_id is not None else None


def _whole(epochs: float) -> float | int:
    """OpenAI's n_epochs is an integer; a fractional one given natively is shown as it is."""
    return int(epochs) if epochs.is_integer() else epochs
