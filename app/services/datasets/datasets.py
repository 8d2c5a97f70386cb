"""Datasets: validated at upload, stored whole in the registry (the worker reads them from there)."""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.contract.kinds import ACTIVE_STATUSES
from app.db.models import NAME_CHARS, Dataset, Evaluation, Tenant, TuningJob
from app.errors import Conflict, InvalidRequest, NotFound
from app.services.datasets import uploads
from app.services.datasets.labels import LabelLimits, check_labels
from app.services.datasets.parsing import Record, decode_records, token_stats
from app.services.datasets.uploads import Upload
from app.services.pagination import paginate
from app.services.tenancy import idempotency, quotas
from app.services.tenancy.tenants import Caller


def store_upload(
    session: Session,
    *,
    caller: Caller,
    settings: Settings,
    stream: BinaryIO,
    filename: str,
    name: str | None,
    count_tokens: Callable[[str], int] | None,
    idempotency_key: str | None,
) -> tuple[Dataset, bool]:
    """An uploaded file read within its limit, parsed and stored: POST /v1/datasets and POST /v1/files
    both. Blocking, so run in a worker thread; a large file is parsed in a process of its own
    (app/services/datasets/uploads.py): parsing 50 MB takes seconds, and the event loop serves everyone
    meanwhile."""
    upload = uploads.receive(stream, limit=settings.max_upload_bytes)
    try:
        dataset, created = create_dataset(
            session,
            caller=caller,
            upload=upload,
            filename=filename,
            name=name,
            min_examples=settings.min_examples,
            max_examples=settings.max_examples,
            max_references=settings.max_references,
            labels=LabelLimits.of(settings),
            count_tokens=count_tokens,
            idempotency_key=idempotency_key,
        )
    finally:
        upload.close()
    return dataset, created


def create_dataset(
    session: Session,
    *,
    caller: Caller,
    upload: Upload,
    filename: str,
    name: str | None,
    min_examples: int,
    max_examples: int,
    labels: LabelLimits,
    max_references: int,
    count_tokens: Callable[[str], int] | None,
    idempotency_key: str | None = None,
) -> tuple[Dataset, bool]:
    """The new dataset and True, or the one an earlier upload with the same key made and False. A
    classification dataset's classes obey the same limits as a task's labels
    (app/services/datasets/labels.py)."""
    if len(filename) > NAME_CHARS:
        raise InvalidRequest(
            f"The file name is {len(filename)} characters; the limit is {NAME_CHARS}.", param="file"
        )
    request_sha256 = idempotency.fingerprint({"sha256": upload.sha256, "filename": filename, "name": name})
    existing = idempotency.earlier(
        session, Dataset, tenant_id=caller.tenant_id, key=idempotency_key, request_sha256=request_sha256
    )
    if existing is not None:
        return existing, False
    quotas.check_upload(session, caller=caller, size=upload.size)
    parsed = uploads.parse(
        upload,
        filename=filename,
        min_examples=min_examples,
        max_examples=max_examples,
        max_references=max_references,
    )
    if parsed.labels is not None:
        check_labels(parsed.labels, limits=labels, count_tokens=count_tokens, param="label")
    stats = parsed.stats
    if count_tokens is not None:
        stats = {**stats, **token_stats(parsed.token_sample, count_tokens)}
    dataset = Dataset(
        tenant_id=caller.tenant_id,
        name=name or filename,
        filename=filename,
        format=parsed.format,
        kind=parsed.kind,
        num_examples=parsed.num_examples,
        labels=parsed.labels,
        stats=stats,
        sha256=parsed.sha256,
        records=parsed.records,
        size_bytes=upload.size,
        idempotency_key=idempotency_key or None,
        request_sha256=request_sha256,
    )
    return idempotency.insert(session, dataset)


def get_dataset(session: Session, *, tenant_id: int, dataset_id: int, param: str | None = None) -> Dataset:
    """Another tenant's dataset is not found, in the same words as one that never existed."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound(f"No dataset with id {dataset_id}.", param=param)
    return dataset


def list_datasets(
    session: Session, *, tenant_id: int, limit: int, after: int | None
) -> tuple[list[Dataset], bool]:
    query = select(Dataset).where(Dataset.tenant_id == tenant_id)
    return paginate(session, query, id_column=Dataset.id, limit=limit, after=after)


def lock_datasets(session: Session, *, tenant_id: int) -> None:
    """Serialise, within a tenant, deleting a dataset and creating a run (a job, an evaluation) that uses
    one: each takes this lock first in its transaction, so a delete's in-use check sees every run committed
    before it, and a run is never created on a dataset being deleted. Without it both could succeed, and
    the run failed later with dataset_missing. The lock is a no-op update of the tenant's row, held to the
    end of the transaction: a row lock on PostgreSQL, the database's write lock on SQLite (which has no
    FOR UPDATE). The tenant's row is a few bytes, where a dataset's holds all its records."""
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(name=Tenant.name))


def delete_dataset(session: Session, *, tenant_id: int, dataset_id: int) -> None:
    lock_datasets(session, tenant_id=tenant_id)
    dataset = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    uses = {
        "job": (
            TuningJob,
            (TuningJob.training_dataset_id == dataset_id) | (TuningJob.validation_dataset_id == dataset_id),
        ),
        "evaluation": (Evaluation, Evaluation.dataset_id == dataset_id),
    }
    for noun, (table, using) in uses.items():
        active = session.scalars(
            select(table.id).where(using, table.status.in_(ACTIVE_STATUSES)).limit(1)
        ).first()
        if active is not None:
            raise Conflict(
                f"Dataset {dataset_id} is used by {noun} {active}, which is still queued or running.",
                code="dataset_in_use",
            )
    session.delete(dataset)


def load_records(session: Session, *, tenant_id: int, dataset_id: int) -> list[Record]:
    dataset = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    return decode_records(dataset.records)
