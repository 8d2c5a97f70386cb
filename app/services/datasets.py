"""Datasets: validated at upload, stored whole in the registry (the worker reads them from there)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Dataset, TuningJob
from app.errors import Conflict, NotFound
from app.services import idempotency, quotas
from app.services.dataset_parsing import ParsedDataset, dataset_stats, parse_dataset
from app.services.pagination import paginate
from app.services.tenants import Caller


def create_dataset(
    session: Session,
    *,
    caller: Caller,
    data: bytes,
    filename: str,
    name: str | None,
    min_examples: int,
    max_examples: int,
    count_tokens: Callable[[str], int] | None,
    idempotency_key: str | None = None,
) -> tuple[Dataset, bool]:
    """The new dataset and True, or the one an earlier upload with the same key made and False."""
    request_sha256 = idempotency.fingerprint(
        {"sha256": hashlib.sha256(data).hexdigest(), "filename": filename, "name": name}
    )
    existing = idempotency.earlier(
        session, Dataset, tenant_id=caller.tenant_id, key=idempotency_key, request_sha256=request_sha256
    )
    if existing is not None:
        return existing, False
    quotas.check_upload(session, caller=caller, size=len(data))
    parsed = parse_dataset(data, filename=filename, min_examples=min_examples, max_examples=max_examples)
    dataset = Dataset(
        tenant_id=caller.tenant_id,
        name=name or filename,
        filename=filename,
        format=parsed.format,
        kind=parsed.kind,
        num_examples=len(parsed.records),
        labels=parsed.labels,
        stats=dataset_stats(parsed, count_tokens),
        sha256=parsed.sha256,
        records=_encode_records(parsed),
        size_bytes=len(data),
        idempotency_key=idempotency_key or None,
        request_sha256=request_sha256,
    )
    session.add(dataset)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()  # two uploads with the same key raced; the other one won
        existing = idempotency.earlier(
            session, Dataset, tenant_id=caller.tenant_id, key=idempotency_key, request_sha256=request_sha256
        )
        if existing is None:
            raise
        return existing, False
    return dataset, True


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


def delete_dataset(session: Session, *, tenant_id: int, dataset_id: int) -> None:
    dataset = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    users = (TuningJob.training_dataset_id == dataset_id) | (TuningJob.validation_dataset_id == dataset_id)
    active = session.scalars(
        select(TuningJob.id).where(users, TuningJob.status.in_(quotas.ACTIVE_JOB_STATUSES)).limit(1)
    ).first()
    if active is not None:
        raise Conflict(
            f"Dataset {dataset_id} is used by job {active}, which is still queued or running.",
            code="dataset_in_use",
        )
    session.delete(dataset)


def load_records(session: Session, *, tenant_id: int, dataset_id: int) -> list[tuple[str, str]]:
    dataset = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    return [tuple(json.loads(line)) for line in dataset.records.decode().split("\n")]


def _encode_records(parsed: ParsedDataset) -> bytes:
    return "\n".join(json.dumps(list(pair), ensure_ascii=False) for pair in parsed.records).encode()
