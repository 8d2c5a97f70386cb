"""Running one tuning job on a worker: claim it, train, and publish exactly one version, or record why not.

Each database touch is its own short transaction so the API sees progress live and a crash mid-training
leaves the job's last reported state behind."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update

from app.db.models import TuningJob, utcnow
from app.db.session import session_scope
from app.errors import DomainError
from app.ml.backbone import Backbone
from app.ml.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from app.ml.soft_prompt import init_prompt, prompt_to_bytes
from app.ml.trainer import Example, Progress, TrainConfig, train_prompt
from app.services import jobs as jobs_service
from app.services.datasets import get_dataset, load_records
from app.services.prompts import publish_version

log = logging.getLogger(__name__)

# Progress is written at most this often; a fast job would otherwise spend its time in the database.
PROGRESS_INTERVAL_S = 1.0
CANCEL_POLL_INTERVAL_S = 1.0


@dataclass
class JobInputs:
    kind: str
    labels: list[str] | None
    train: list[Example]
    validation: list[Example]


def run_job(
    *,
    db_url: str,
    job_id: int,
    backbone: Backbone,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
) -> str:
    """Runs the job if this call wins the claim. Returns the job's status afterwards.

    With ``checkpoint_dir``, the run's state is saved there every ``checkpoint_every`` steps, and a job
    that finds a checkpoint of its own continues from it (a job handed back or re-queued after its worker
    died); the file goes once the job ends."""
    worker = f"{socket.gethostname()}:{os.getpid()}"
    if not _claim(db_url=db_url, job_id=job_id, worker=worker):
        log.info("job %s not claimed: it is not queued (duplicate delivery or cancelled)", job_id)
        return "skipped"
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / f"job-{job_id}.safetensors"
    status = "failed"
    try:
        inputs, job = _load_inputs(db_url=db_url, job_id=job_id)
        status = _train_and_publish(
            db_url=db_url,
            job=job,
            inputs=inputs,
            backbone=backbone,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
        )
    except DomainError as error:
        _fail(db_url=db_url, job_id=job_id, code=error.code, message=error.message)
    except Exception as error:  # a failed job must say why, whatever broke
        log.exception("job %s failed", job_id)
        _fail(db_url=db_url, job_id=job_id, code="training_error", message=f"{type(error).__name__}: {error}")
    # The job ended (a killed worker never gets here, and its checkpoint waits for the next attempt).
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return status


def _claim(*, db_url: str, job_id: int, worker: str) -> bool:
    """Compare-and-set queued -> running, so a second delivery of the same message does nothing."""
    with session_scope(db_url) as session:
        claimed = session.execute(
            update(TuningJob)
            .where(TuningJob.id == job_id, TuningJob.status == "queued")
            .values(status="running", started_at=utcnow(), worker=worker, attempts=TuningJob.attempts + 1)
        ).rowcount
        if claimed:
            job = session.get(TuningJob, job_id)
            jobs_service.add_event(
                session,
                job=job,
                type="status",
                message="Job started.",
                data={"status": "running", "worker": worker},
            )
        return bool(claimed)


def _load_inputs(*, db_url: str, job_id: int) -> tuple[JobInputs, TuningJob]:
    with session_scope(db_url) as session:
        job = jobs_service.get_job(session, job_id=job_id)
        if job.training_dataset_id is None:
            raise DomainError("The training dataset was deleted.", code="dataset_missing")
        train_records = load_records(session, dataset_id=job.training_dataset_id)
        dataset = get_dataset(session, dataset_id=job.training_dataset_id)
        kind, labels = dataset.kind, dataset.labels
        if job.validation_dataset_id is not None:
            validation_records = load_records(session, dataset_id=job.validation_dataset_id)
        else:
            train_records, validation_records = _split(train_records, seed=job.hyperparameters["seed"])
        session.expunge(job)
    inputs = JobInputs(
        kind=kind,
        labels=labels,
        train=[Example(input=i, output=o) for i, o in train_records],
        validation=[Example(input=i, output=o) for i, o in validation_records],
    )
    return inputs, job


def _split(records: list[tuple[str, str]], *, seed: int) -> tuple[list, list]:
    size = jobs_service.holdout_size(len(records))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


def _resume_from(db_url: str, job_id: int, checkpoint: Path | None) -> Checkpoint | None:
    if checkpoint is None or not checkpoint.is_file():
        return None
    try:
        resume = load_checkpoint(checkpoint)
    except Exception as error:  # an unreadable file costs the steps it saved, never the job
        log.warning("job %s: checkpoint %s unreadable (%s); starting over", job_id, checkpoint, error)
        return None
    with session_scope(db_url) as session:
        jobs_service.add_event(
            session,
            job=session.get(TuningJob, job_id),
            type="status",
            message=f"Resuming from the checkpoint after step {resume.step}.",
            data={"status": "running", "resumed_from_step": resume.step},
        )
    return resume


def _train_and_publish(
    *,
    db_url: str,
    job: TuningJob,
    inputs: JobInputs,
    backbone: Backbone,
    checkpoint: Path | None,
    checkpoint_every: int,
) -> str:
    hp = job.hyperparameters
    prompt = init_prompt(
        backbone,
        num_virtual_tokens=job.num_virtual_tokens,
        strategy=job.init["strategy"],
        text=job.init.get("text"),
        labels=inputs.labels,
        seed=hp["seed"],
    )
    config = TrainConfig(
        steps=hp["steps"],
        batch_size=hp["batch_size"],
        learning_rate=hp["learning_rate"],
        weight_decay=hp["weight_decay"],
        warmup_steps=hp["warmup_steps"],
        max_grad_norm=hp["max_grad_norm"],
        seed=hp["seed"],
        eval_every=hp["eval_every"],
        patience=hp.get("patience", 0),
        optimizer=hp.get("optimizer", "adamw"),
        append_eos=inputs.kind != "classification",
        checkpoint_every=checkpoint_every if checkpoint is not None else 0,
    )
    reporter = _Reporter(db_url=db_url, job_id=job.id)
    result = train_prompt(
        backbone,
        prompt=prompt,
        train=inputs.train,
        validation=inputs.validation,
        template=job.template,
        labels=inputs.labels,
        config=config,
        on_progress=reporter.progress,
        should_stop=reporter.cancel_requested,
        resume=_resume_from(db_url, job.id, checkpoint),
        on_checkpoint=None if checkpoint is None else lambda state: save_checkpoint(checkpoint, state),
    )
    metrics = result.metrics
    with session_scope(db_url) as session:
        row = session.get(TuningJob, job.id, with_for_update=True)
        if result.stopped or row.cancel_requested:
            row.status, row.finished_at = "cancelled", utcnow()
            jobs_service.add_event(
                session,
                job=row,
                type="status",
                message="Job cancelled; no version written.",
                data={"status": "cancelled", "step": result.steps_done},
            )
            return "cancelled"
        version = publish_version(
            session,
            job=row,
            vectors=prompt_to_bytes(result.prompt),
            embedding_dim=backbone.embedding_dim,
            kind=inputs.kind,
            labels=inputs.labels,
            metrics=metrics,
        )
        row.status, row.finished_at, row.metrics = "succeeded", utcnow(), metrics
        row.result_version = version.version
        row.progress = {**row.progress, "step": result.steps_done, "eta_seconds": 0}
        jobs_service.add_event(session, job=row, type="metrics", message="Evaluation finished.", data=metrics)
        jobs_service.add_event(
            session,
            job=row,
            type="status",
            message=f"Job succeeded: {row.task}@{version.version}.",
            data={"status": "succeeded", "task": row.task, "version": version.version},
        )
    return "succeeded"


def _fail(*, db_url: str, job_id: int, code: str, message: str) -> None:
    with session_scope(db_url) as session:
        job = session.get(TuningJob, job_id)
        job.status, job.finished_at = "failed", utcnow()
        job.error_code, job.error_message = code, message
        jobs_service.add_event(
            session, job=job, type="error", message=message, data={"status": "failed", "code": code}
        )


class _Reporter:
    """Turns trainer callbacks into throttled database writes."""

    def __init__(self, *, db_url: str, job_id: int):
        self.db_url, self.job_id = db_url, job_id
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False

    def progress(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_INTERVAL_S and p.step not in (1, p.total_steps):
            return
        self._last_progress = now
        progress = {"step": p.step, "total_steps": p.total_steps, "eta_seconds": p.eta_seconds}
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

    def cancel_requested(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= CANCEL_POLL_INTERVAL_S:
            self._last_cancel_check = now
            with session_scope(self.db_url) as session:
                self._cancelled = bool(session.get(TuningJob, self.job_id).cancel_requested)
        return self._cancelled
