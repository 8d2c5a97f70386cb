"""Thin Celery tasks: they carry a job's (or an evaluation's) id and hand it to its service."""

from __future__ import annotations

from collections.abc import Callable

from celery import signals
from celery.exceptions import Reject
from prometheus_client import start_http_server

from app import logs
from app.config import get_settings
from app.db.models import Evaluation, TuningJob
from app.db.session import session_scope
from app.errors import UnsupportedBackbone
from app.services import leases, turns, worker_metrics
from app.services.evaluating import refuse_evaluation, run_evaluation
from app.services.queue import EVALUATE_TASK, TRAIN_TASK
from app.services.training import HANDBACK, RunOutcome, refuse_job, run_job
from workers.backbones import get_backbone
from workers.celery_app import celery


@signals.worker_process_init.connect
def _load_default_backbone_in_child(**_: object) -> None:
    # Prefork pool: load after the fork (CUDA does not survive one), before the first job arrives.
    get_backbone(get_settings().default_backbone)


@signals.worker_ready.connect
def _load_default_backbone_solo(sender=None, **_: object) -> None:
    # Solo and thread pools run jobs in this process, which never sees worker_process_init.
    if sender is not None and "prefork" not in type(sender.pool).__module__:
        get_backbone(get_settings().default_backbone)
        port = get_settings().worker_metrics_port
        if port:
            start_http_server(port)  # a daemon thread; its counts are this process's jobs


@signals.worker_shutting_down.connect
def _hand_back_the_running_job(**_: object) -> None:
    # SIGTERM: Celery's warm shutdown waits for the running task; this makes that wait one training step.
    HANDBACK.set()


@celery.task(name=TRAIN_TASK)
def run_tuning_job(job_id: int) -> RunOutcome:
    if HANDBACK.is_set():
        # Shutting down: a message fetched now goes back to the broker for another worker, untouched.
        raise Reject("worker shutting down", requeue=True)
    # Every line logged about this job carries its id and task; the worker's own lines between jobs do not.
    job_token = logs.job_id.set(job_id)
    task_token = logs.task.set(None)
    try:
        return _take_turns(job_id, kind=leases.JOBS, run=_train)
    finally:
        logs.job_id.reset(job_token)
        logs.task.reset(task_token)


# A message whose chosen run another worker claimed first chooses again, this many times in all.
CHOICES = 3


def _take_turns(preferred: int, *, kind: leases.Leased, run: Callable[[int], RunOutcome]) -> RunOutcome:
    """Runs the queued row whose tenant is owed a turn (app/services/turns.py), which may not be the
    message's own; the message's row is then run by another message, or sent again by the reaper."""
    db_url = get_settings().registry_url
    outcome = RunOutcome.SKIPPED
    for _ in range(CHOICES):
        chosen = turns.next_run(db_url=db_url, kind=kind, preferred=preferred)
        outcome = run(chosen)
        if outcome != RunOutcome.SKIPPED or chosen == preferred:
            return outcome
    return outcome


def _train(job_id: int) -> RunOutcome:
    settings = get_settings()
    with session_scope(settings.registry_url) as session:
        job = session.get(TuningJob, job_id)
        base_model = job.base_model if job else None
        logs.task.set(job.task if job else None)
    if base_model is None:
        return RunOutcome.MISSING
    logs.job_id.set(job_id)  # the row chosen, which may not be the message's
    try:
        backbone = get_backbone(base_model)
    except UnsupportedBackbone as error:  # no worker can run it: the job says why instead of waiting
        outcome = refuse_job(db_url=settings.registry_url, job_id=job_id, error=error)
    else:
        outcome = run_job(
            db_url=settings.registry_url,
            job_id=job_id,
            backbone=backbone,
            checkpoint_every=settings.checkpoint_every_steps,
            lease_s=settings.job_lease_s,
            time_slice_s=settings.run_time_slice_s,
        )
    worker_metrics.JOBS.labels(outcome).inc()
    return outcome


@celery.task(name=EVALUATE_TASK)
def run_evaluation_task(evaluation_id: int) -> RunOutcome:
    if HANDBACK.is_set():
        raise Reject("worker shutting down", requeue=True)
    outcome = _take_turns(evaluation_id, kind=leases.EVALUATIONS, run=_evaluate)
    worker_metrics.EVALUATIONS.labels(outcome).inc()
    return outcome


def _evaluate(evaluation_id: int) -> RunOutcome:
    settings = get_settings()
    with session_scope(settings.registry_url) as session:
        evaluation = session.get(Evaluation, evaluation_id)
        base_model = evaluation.base_model if evaluation else None
    if base_model is None:
        return RunOutcome.MISSING
    try:
        backbone = get_backbone(base_model)
    except UnsupportedBackbone as error:
        return refuse_evaluation(db_url=settings.registry_url, evaluation_id=evaluation_id, error=error)
    return run_evaluation(
        db_url=settings.registry_url,
        evaluation_id=evaluation_id,
        backbone=backbone,
        lease_s=settings.job_lease_s,
        chunk_rows=settings.evaluation_batch_rows,
        time_slice_s=settings.run_time_slice_s,
    )
