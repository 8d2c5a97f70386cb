"""Thin Celery tasks: they carry a job's (or an evaluation's) id and hand it to its service, both through
one wrapper (log ids, turns, backbone, refusal, the worker's metrics)."""

from __future__ import annotations

from collections.abc import Callable

from celery import signals
from celery.exceptions import Reject
from prometheus_client import Counter, start_http_server

from app import logs
from app.config import Settings, get_settings
from app.db.session import session_scope
from app.errors import UnsupportedBackbone
from app.ml.backbone import Backbone
from app.services.evaluation.evaluating import run_evaluation
from app.services.runs import leases, turns, worker_metrics
from app.services.runs.lifecycle import HANDBACK, RunOutcome, refuse
from app.services.runs.queue import EVALUATE_TASK, TRAIN_TASK
from app.services.tuning.training import run_job
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
    return _run(leases.JOBS, job_id, start=_train, counted=worker_metrics.JOBS)


@celery.task(name=EVALUATE_TASK)
def run_evaluation_task(evaluation_id: int) -> RunOutcome:
    return _run(leases.EVALUATIONS, evaluation_id, start=_evaluate, counted=worker_metrics.EVALUATIONS)


# A message whose chosen run another worker claimed first chooses again, this many times in all.
CHOICES = 3
Start = Callable[[Settings, int, Backbone], RunOutcome]


def _run(kind: leases.Leased, preferred: int, *, start: Start, counted: Counter) -> RunOutcome:
    """One message: the queued row whose tenant is owed a turn (app/services/runs/turns.py), which may not be
    the message's own; the message's row is then run by another message, or sent again by the reaper."""
    if HANDBACK.is_set():
        # Shutting down: a message fetched now goes back to the broker for another worker, untouched.
        raise Reject("worker shutting down", requeue=True)
    db_url = get_settings().registry_url
    outcome = RunOutcome.SKIPPED
    for _ in range(CHOICES):
        chosen = turns.next_run(db_url=db_url, kind=kind, preferred=preferred)
        outcome = _run_one(kind, chosen, start)
        counted.labels(outcome).inc()
        if outcome != RunOutcome.SKIPPED or chosen == preferred:
            break
    return outcome


def _run_one(kind: leases.Leased, row_id: int, start: Start) -> RunOutcome:
    """The row run on its backbone, every line logged meanwhile carrying its id and task; or failed, saying
    why, when no worker can load its backbone."""
    settings = get_settings()
    with session_scope(settings.registry_url) as session:
        row = session.get(kind.table, row_id)
        base_model = row.base_model if row is not None else None
        task = getattr(row, "task", None)
    if base_model is None:
        return RunOutcome.MISSING
    id_token, task_token = logs.RUN_IDS[kind.noun].set(row_id), logs.task.set(task)
    try:
        backbone = get_backbone(base_model)
    except UnsupportedBackbone as error:  # no worker can run it: the row says why instead of waiting
        return refuse(
            kind, db_url=settings.registry_url, row_id=row_id, error=error, lease_s=settings.job_lease_s
        )
    else:
        return start(settings, row_id, backbone)
    finally:
        logs.RUN_IDS[kind.noun].reset(id_token)
        logs.task.reset(task_token)


def _train(settings: Settings, job_id: int, backbone: Backbone) -> RunOutcome:
    return run_job(
        db_url=settings.registry_url,
        job_id=job_id,
        backbone=backbone,
        checkpoint_every=settings.checkpoint_every_steps,
        lease_s=settings.job_lease_s,
        time_slice_s=settings.run_time_slice_s,
    )


def _evaluate(settings: Settings, evaluation_id: int, backbone: Backbone) -> RunOutcome:
    return run_evaluation(
        db_url=settings.registry_url,
        evaluation_id=evaluation_id,
        backbone=backbone,
        lease_s=settings.job_lease_s,
        chunk_rows=settings.evaluation_batch_rows,
        time_slice_s=settings.run_time_slice_s,
    )
