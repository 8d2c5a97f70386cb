"""The Celery application of the worker process. Configured from the same Settings as the API."""

from __future__ import annotations

from celery import Celery

from app.config import get_settings
from app.services.runs.queue import celery_config

settings = get_settings()
celery = Celery("softprompt", include=["workers.tasks"])
celery.conf.update(
    **celery_config(settings),
    # One job at a time per process, acknowledged when it ends: a worker that dies mid-job has not
    # consumed it. The job row (not the broker) decides whether a delivery still has work to do.
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=False,
    worker_hijack_root_logger=False,
    # No remote control: cancels and leases go through the registry. On RabbitMQ its queue is exclusive to
    # a node name, so a second worker on the same host could not start.
    worker_enable_remote_control=False,
)
