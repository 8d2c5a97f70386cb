"""Evaluation runs: a dataset scored by several models (pinned versions, or the bare backbone), queued for
the workers like a job. Creating one checks everything a worker would trip over later: the dataset fits
every model (kind and labels), the models share one backbone, the work is within its limits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.contract.kinds import FINISHED_STATUSES, DatasetKind, JobStatus
from app.db.models import Dataset, Evaluation, EvaluationModel, PromptVersion, utcnow
from app.errors import Conflict, InvalidRequest, NotFound
from app.services.datasets.datasets import get_dataset, load_records, lock_datasets
from app.services.pagination import paginate
from app.services.registry.prompts import check_template, find_version
from app.services.runs import metadata as run_metadata
from app.services.runs.queue import enqueue_evaluation, send_committed
from app.services.tenancy import idempotency, quotas
from app.services.tenancy.tenants import Caller

log = logging.getLogger(__name__)

# Greedy decoding of a generation evaluation stops at the end of the answer or after this many tokens.
DEFAULT_MAX_NEW_TOKENS = 64
# The dataset kinds a version of each kind can be scored on.
FITTING_KINDS = {
    DatasetKind.CLASSIFICATION: (DatasetKind.CLASSIFICATION,),
    DatasetKind.GENERATION: (DatasetKind.GENERATION, DatasetKind.REFERENCES),
}


@dataclass(frozen=True)
class EvaluationRequest:
    dataset: int
    models: list[str | None]  # "task", "task@3", or None for the bare backbone
    template: str | None  # the bare backbone's; absent: the first named task's
    max_new_tokens: int | None
    metadata: dict[str, str] | None = None

    def fingerprint(self) -> str:
        fields = dict(self.__dict__)
        if self.metadata is None:
            del fields["metadata"]  # as requests were hashed before there was metadata: their retries match
        return idempotency.fingerprint(fields)


def submit_evaluation(
    session: Session,
    *,
    caller: Caller,
    request: EvaluationRequest,
    settings: Settings,
    idempotency_key: str | None,
) -> tuple[Evaluation, bool]:
    """``create_evaluation``, committed, then sent to the workers (after the commit, so a worker always
    finds the row)."""
    evaluation, created = create_evaluation(
        session, caller=caller, request=request, settings=settings, idempotency_key=idempotency_key
    )
    session.commit()
    if evaluation.status == JobStatus.QUEUED:
        send_committed(settings, enqueue_evaluation, noun="evaluation", id_=evaluation.id)
    return evaluation, created


def create_evaluation(
    session: Session,
    *,
    caller: Caller,
    request: EvaluationRequest,
    settings: Settings,
    idempotency_key: str | None,
) -> tuple[Evaluation, bool]:
    """The new evaluation and True, or the one an earlier request with the same key made and False."""
    earlier = {"tenant_id": caller.tenant_id, "key": idempotency_key, "request_sha256": request.fingerprint()}
    existing = idempotency.earlier(session, Evaluation, **earlier)
    if existing is not None:
        return existing, False
    lock_datasets(session, tenant_id=caller.tenant_id)
    dataset = get_dataset(session, tenant_id=caller.tenant_id, dataset_id=request.dataset, param="dataset")
    if dataset.num_examples > settings.max_evaluation_rows:
        raise InvalidRequest(
            f"Dataset {dataset.id} has {dataset.num_examples} rows; an evaluation scores at most "
            f"{settings.max_evaluation_rows} (SOFTPROMPT_MAX_EVALUATION_ROWS). Upload a sample.",
            param="dataset",
            code="too_many_rows",
        )
    versions = _versions(session, caller=caller, request=request, settings=settings)
    for index, version in enumerate(versions):
        if version is not None:
            _check_fits(session, dataset, version, param=f"models[{index}]")
    template = _template(request, versions, settings=settings)
    max_new_tokens = _max_new_tokens(request, settings)
    _check_work(dataset, versions, max_new_tokens=max_new_tokens, settings=settings)
    named = [v for v in versions if v is not None]
    base_model = named[0].base_model if named else settings.default_backbone
    quotas.check_active_jobs(session, caller=caller, table=Evaluation)
    evaluation = Evaluation(
        tenant_id=caller.tenant_id,
        dataset_id=dataset.id,
        kind=dataset.kind,
        base_model=base_model,
        template=template,
        max_new_tokens=max_new_tokens,
        progress={"done": 0, "total": dataset.num_examples * len(versions)},
        idempotency_key=idempotency_key or None,
        request_sha256=request.fingerprint(),
        # While queued, the lease says when to send the message again if no worker has claimed it.
        lease_expires_at=utcnow() + timedelta(seconds=settings.job_resend_after_s),
        models=[
            EvaluationModel(
                position=index,
                reference=None if v is None else f"{v.task.name}@{v.version}",
                version_id=None if v is None else v.id,
            )
            for index, v in enumerate(versions)
        ],
    )
    evaluation, created = idempotency.insert(session, evaluation)
    if created:
        run_metadata.keep(session, evaluation, request.metadata)
    return evaluation, created


def _check_work(
    dataset: Dataset, versions: list[PromptVersion | None], *, max_new_tokens: int, settings: Settings
) -> None:
    """An evaluation's work, counted before it is accepted: rows x models x the new tokens each row may
    decode (generation) or the labels each row ranks (classification)."""
    per_row, unit = max_new_tokens, "new tokens"
    if dataset.kind == DatasetKind.CLASSIFICATION:
        per_row, unit = (
            max(len(v.labels or []) if v else len(dataset.labels or []) for v in versions),
            "labels",
        )
    work = dataset.num_examples * len(versions) * per_row
    if work > settings.max_evaluation_work:
        raise InvalidRequest(
            f"This evaluation is {work:,} units of work ({dataset.num_examples} rows x {len(versions)} "
            f"models x {per_row} {unit}); one evaluation may do at most {settings.max_evaluation_work:,} "
            "(SOFTPROMPT_MAX_EVALUATION_WORK). Score a sample, fewer models or fewer new tokens.",
            param="max_new_tokens" if unit == "new tokens" else "dataset",
            code="too_much_work",
        )


def _versions(
    session: Session, *, caller: Caller, request: EvaluationRequest, settings: Settings
) -> list[PromptVersion | None]:
    """Each named model's version, pinned now (a later version does not change what this run means)."""
    if not 1 <= len(request.models) <= settings.max_evaluation_models:
        raise InvalidRequest(
            f"models names {len(request.models)} models; an evaluation compares 1 to "
            f"{settings.max_evaluation_models} (SOFTPROMPT_MAX_EVALUATION_MODELS).",
            param="models",
        )
    versions: list[PromptVersion | None] = []
    for index, ref in enumerate(request.models):
        if ref is None:
            versions.append(None)
            continue
        try:
            versions.append(find_version(session, tenant_id=caller.tenant_id, ref=ref, with_vectors=False))
        except (InvalidRequest, NotFound) as error:
            error.param = f"models[{index}]"
            raise
    backbones = {v.base_model for v in versions if v is not None}
    if len(backbones) > 1:
        raise InvalidRequest(
            f"The models were trained on different backbones ({', '.join(sorted(backbones))}); an "
            "evaluation runs one backbone. Compare the versions of one backbone at a time.",
            param="models",
        )
    return versions


def _check_fits(session: Session, dataset: Dataset, version: PromptVersion, *, param: str) -> None:
    """The dataset's rows are something ``version`` can answer: its kind, and (classification) only the
    labels the version knows. A misfit names the first row it shows on."""
    ref = f"{version.task.name}@{version.version}"
    if dataset.kind not in FITTING_KINDS.get(version.kind, ()):
        raise InvalidRequest(
            f"Row 1 of dataset {dataset.id} is a {dataset.kind} record, but {ref} is a {version.kind} "
            "task; evaluate it on data of its own kind.",
            param=param,
            line=1,
            code="dataset_does_not_fit",
        )
    unknown = set(dataset.labels or ()) - set(version.labels or ())
    if unknown:
        records = load_records(session, tenant_id=dataset.tenant_id, dataset_id=dataset.id)
        row, label = next((i, label) for i, (_, label) in enumerate(records) if label in unknown)
        raise InvalidRequest(
            f"Row {row + 1} of dataset {dataset.id} has the label {label!r}, which {ref} does not know "
            f"(its labels: {', '.join(version.labels or [])}).",
            param=param,
            line=row + 1,
            code="dataset_does_not_fit",
        )


def _template(request: EvaluationRequest, versions: list[PromptVersion | None], *, settings: Settings) -> str:
    """The bare backbone's template: the request's, or else the first named task's."""
    if request.template is not None:
        return check_template(request.template, max_chars=settings.max_template_chars)
    named = [v for v in versions if v is not None]
    if named:
        return named[0].template
    raise InvalidRequest(
        "template is needed to evaluate the bare backbone when no task is named (for example "
        '"Review: {input}\\nSentiment:").',
        param="template",
    )


def _max_new_tokens(request: EvaluationRequest, settings: Settings) -> int:
    value = DEFAULT_MAX_NEW_TOKENS if request.max_new_tokens is None else request.max_new_tokens
    if not 1 <= value <= settings.max_new_tokens:
        raise InvalidRequest(
            f"max_new_tokens must be between 1 and {settings.max_new_tokens}; got {value}.",
            param="max_new_tokens",
        )
    return value


def get_evaluation(session: Session, *, tenant_id: int, evaluation_id: int) -> Evaluation:
    """Another tenant's evaluation is not found, in the same words as one that never existed."""
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None or evaluation.tenant_id != tenant_id:
        raise NotFound(f"No evaluation with id {evaluation_id}.")
    return evaluation


def _literal(text: str) -> str:
    """``text`` as a LIKE pattern that matches only itself: its escape character, % and _ escaped."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_evaluations(
    session: Session,
    *,
    tenant_id: int,
    limit: int,
    after: int | None,
    task: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Evaluation], bool]:
    """The tenant's evaluations, newest first; with ``task``, those that include one of its versions; with
    ``metadata``, those whose metadata holds all its pairs."""
    query = run_metadata.matching(
        select(Evaluation).where(Evaluation.tenant_id == tenant_id), Evaluation, metadata or {}
    )
    if task is not None:
        named = select(EvaluationModel.evaluation_id).where(
            EvaluationModel.reference.like(_literal(task) + "@%", escape="\\")
        )
        query = query.where(Evaluation.id.in_(named))
    return paginate(session, query, id_column=Evaluation.id, limit=limit, after=after)


def evaluations_of_version(session: Session, *, version: PromptVersion) -> list[int]:
    """The ids of the evaluations that include ``version``, oldest first."""
    return list(
        session.scalars(
            select(EvaluationModel.evaluation_id)
            .where(EvaluationModel.version_id == version.id)
            .order_by(EvaluationModel.evaluation_id)
            .distinct()
        )
    )


def predictions(session: Session, *, tenant_id: int, evaluation_id: int) -> bytes:
    """The per-example predictions (JSON lines) of a finished evaluation."""
    evaluation = get_evaluation(session, tenant_id=tenant_id, evaluation_id=evaluation_id)
    if evaluation.status != JobStatus.SUCCEEDED or evaluation.predictions is None:
        raise Conflict(
            f"Evaluation {evaluation_id} is {evaluation.status}; its predictions exist once it succeeded.",
            code="evaluation_not_finished",
        )
    return evaluation.predictions


def cancel_evaluation(session: Session, *, tenant_id: int, evaluation_id: int) -> Evaluation:
    """A queued evaluation is cancelled at once; a running one stops at its next chunk of rows."""
    evaluation = get_evaluation(session, tenant_id=tenant_id, evaluation_id=evaluation_id)
    if evaluation.status in FINISHED_STATUSES:
        raise Conflict(
            f"Evaluation {evaluation_id} already {evaluation.status}; only queued or running evaluations "
            "can be cancelled.",
            code="evaluation_finished",
        )
    cancelled = session.execute(
        update(Evaluation)
        .where(Evaluation.id == evaluation_id, Evaluation.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=utcnow(), cancel_requested=True)
    ).rowcount
    if not cancelled:
        evaluation.cancel_requested = True
    session.flush()
    session.refresh(evaluation)
    return evaluation
