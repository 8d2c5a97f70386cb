"""The registry's tables. The job row is the truth about a job; Celery only carries its id."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.contract.kinds import JobStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend: SQLite stores no zone, so it is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# A dataset's file name and its name, which falls back to the file name: what the columns hold, and what
# the API accepts.
NAME_CHARS = 255


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, datetime: UTCDateTime()}


# Owns what was made while the service ran open on the loopback interface, before any key existed.
DEFAULT_TENANT = "default"


class Tenant(Base):
    """A team sharing the service; its API keys say who is calling. Quotas left empty take the server's
    defaults (Settings.tenant_*)."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    max_active_jobs: Mapped[int | None]
    upload_bytes_per_hour: Mapped[int | None] = mapped_column(BigInteger)
    inference_rps: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """Only the key's SHA-256 is kept, and a short prefix that lets a person tell keys apart in a list."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship()


def _owner() -> Mapped[int]:
    # No cascade: removing a tenant must not silently remove what it stored.
    return mapped_column(ForeignKey("tenants.id"), index=True)


class Dataset(Base):
    __tablename__ = "datasets"
    # A retried upload is matched within its tenant only, so a key says nothing about other tenants.
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = _owner()
    name: Mapped[str] = mapped_column(String(NAME_CHARS))
    filename: Mapped[str] = mapped_column(String(NAME_CHARS))
    format: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(32))
    num_examples: Mapped[int]
    labels: Mapped[list[str] | None]
    stats: Mapped[dict[str, Any]]
    sha256: Mapped[str] = mapped_column(String(64))
    # The normalised records as JSON lines of [input, output], zlib-compressed (see encode_records): the
    # worker reads them from here, so a worker on another machine needs nothing but the database.
    records: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # of the uploaded file: the upload quota counts it
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Task(Base):
    __tablename__ = "tasks"
    # Names are the tenant's own: two tenants can both have "sentiment".
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = _owner()
    name: Mapped[str] = mapped_column(String(64))
    # Version numbers are never reused, even after a version is deleted, so "task@3" always means one thing.
    last_version: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[PromptVersion]] = relationship(
        back_populates="task", order_by="PromptVersion.version", cascade="all, delete-orphan"
    )


class PromptVersion(Base):
    """Immutable once written: a new training result is a new version."""

    __tablename__ = "prompt_versions"
    __table_args__ = (UniqueConstraint("task_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    version: Mapped[int]
    base_model: Mapped[str] = mapped_column(String(200))
    num_virtual_tokens: Mapped[int]
    embedding_dim: Mapped[int]
    # app/ml/soft_prompt.py Method: "prompt" ([k, d] embeddings) or "prefix" (keys and values per layer).
    method: Mapped[str] = mapped_column(String(16), default="prompt", server_default="prompt")
    template: Mapped[str] = mapped_column(Text)
    labels: Mapped[list[str] | None]
    kind: Mapped[str] = mapped_column(String(32))
    vectors: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)  # safetensors
    sha256: Mapped[str] = mapped_column(String(64))
    # Unique: a job writes at most one version, whatever retries or duplicate deliveries happen.
    source_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("tuning_jobs.id", ondelete="SET NULL"), unique=True
    )
    source_dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    # The version its job started from, as task@version (the same tenant's); kept as text, so lineage
    # outlives a deleted parent.
    parent: Mapped[str | None] = mapped_column(String(200))
    metrics: Mapped[dict[str, Any]]
    # Of the adapter file an imported version came from: imports count toward the upload quota as datasets
    # do. None for a job's version.
    upload_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    task: Mapped[Task] = relationship(back_populates="versions")


class WorkerRun:
    """The columns of work a worker leases (app/services/runs/leases.py) and a client may retry with an
    Idempotency-Key: jobs and evaluations alike."""

    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.QUEUED)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The client's own key-value pairs (OpenAI's job metadata), as given; RunMetadata rows are what lists
    # filter on. ("metadata" is the declarative base's own attribute, so the column has another name here.)
    client_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class RunMetadata(Base):
    """One pair of a job's or an evaluation's metadata, a row so that a list filters on it in SQL on either
    database (SQLite's JSON paths cannot name a key that holds a double quote)."""

    __tablename__ = "run_metadata"
    __table_args__ = (Index("ix_run_metadata_pair", "key", "value"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("tuning_jobs.id", ondelete="CASCADE"), index=True)
    evaluation_id: Mapped[int | None] = mapped_column(
        ForeignKey("evaluations.id", ondelete="CASCADE"), index=True
    )
    key: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(512))


class TuningJob(WorkerRun, Base):
    __tablename__ = "tuning_jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = _owner()
    task: Mapped[str] = mapped_column(String(64), index=True)
    training_dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    validation_dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    base_model: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(16), default="prompt", server_default="prompt")
    num_virtual_tokens: Mapped[int]
    template: Mapped[str] = mapped_column(Text)
    init: Mapped[dict[str, Any]]
    hyperparameters: Mapped[dict[str, Any]]
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result_version: Mapped[int | None]

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan"
    )


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("tuning_jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))  # status | progress | metrics | error
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[TuningJob] = relationship(back_populates="events")


class JobCheckpoint(Base):
    """A running job's full training state (app/ml/checkpoint.py), saved every few steps and at a hand-back,
    so any worker, on any machine, continues the job where the last one stopped. Gone once the job ends."""

    __tablename__ = "job_checkpoints"

    job_id: Mapped[int] = mapped_column(ForeignKey("tuning_jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int]
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors, with the rest of the state as metadata
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(WorkerRun, Base):
    """One evaluation run: a dataset scored by several models (versions, or the bare backbone). Leased by a
    worker like a job (WorkerRun); its results are written in one
    transaction at the end, so a run restarted after a crash never counts a row twice."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = _owner()
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(32))  # the dataset's, when the run was asked for
    base_model: Mapped[str] = mapped_column(String(200))
    template: Mapped[str] = mapped_column(Text)  # the bare backbone's, when a model is null
    max_new_tokens: Mapped[int]  # generation: greedy decoding stops here or at the end of the answer
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Per-example predictions as JSON lines, one per dataset row, written with the results.
    predictions: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    # The answers of the rows already scored, as JSON (one list per model, in order), saved when the run
    # yields its worker or the worker shuts down, so that the next attempt goes on from there.
    partial_answers: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)

    models: Mapped[list[EvaluationModel]] = relationship(
        back_populates="evaluation", order_by="EvaluationModel.position", cascade="all, delete-orphan"
    )


class EvaluationModel(Base):
    """One model an evaluation compares, in the order the request named it, and its metrics once run."""

    __tablename__ = "evaluation_models"
    __table_args__ = (UniqueConstraint("evaluation_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    position: Mapped[int]
    # "task@3", pinned when the evaluation was created; None for the bare backbone.
    reference: Mapped[str | None] = mapped_column(String(80))
    # The version, while it exists: a version lists the evaluations that include it.
    version_id: Mapped[int | None] = mapped_column(
        ForeignKey("prompt_versions.id", ondelete="SET NULL"), index=True
    )
    metrics: Mapped[dict[str, Any] | None]

    evaluation: Mapped[Evaluation] = relationship(back_populates="models")
