"""Enqueueing by task name: the API never imports the worker package, it only names the Celery task."""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery

from app.config import Settings
from app.errors import Unavailable

log = logging.getLogger(__name__)

# The name on the wire, kept from the first release so that messages queued before an upgrade still run.
TRAIN_TASK = "softprompt.train_prompt"
EVALUATE_TASK = "softprompt.evaluate"


def celery_config(settings: Settings) -> dict:
    """Broker settings shared by the API (which only sends) and the worker (which also consumes)."""
    transport_options: dict = {}
    if settings.broker_key_prefix:
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    amqp = settings.celery_broker_url.startswith(("amqp", "pyamqp"))
    if settings.celery_broker_url.startswith("redis"):
        # Longer than any job: otherwise Redis hands a long job to a second worker while the first still runs.
        transport_options["visibility_timeout"] = 24 * 3600
    if amqp:
        # A message RabbitMQ has not confirmed is a send that failed: the client hears 503 and retries.
        transport_options["confirm_publish"] = True
    return {
        "broker_url": settings.celery_broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # RabbitMQ: a worker runs one job at a time in its main thread, which sends no AMQP heartbeats while
        # it trains, so the broker would drop its connection two heartbeats into any long job. TCP's
        # keep-alive finds a dead peer instead (docs/operations.md, "Choosing the broker").
        **({"broker_heartbeat": 0} if amqp else {}),
        "task_default_queue": settings.queue_name,
        "task_ignore_result": True,
        "result_backend": None,
    }


_clients: dict[tuple[str, str, str], Celery] = {}


def _client(settings: Settings) -> Celery:
    key = (settings.celery_broker_url, settings.broker_key_prefix, settings.queue_name)
    if key not in _clients:
        client = Celery("softprompt-api")
        client.conf.update(celery_config(settings))
        _clients[key] = client
    return _clients[key]


def enqueue_training(settings: Settings, job_id: int) -> None:
    """Call only after the job's row is committed, so the worker always finds it."""
    _client(settings).send_task(TRAIN_TASK, args=[job_id], queue=settings.queue_name)


def enqueue_evaluation(settings: Settings, evaluation_id: int) -> None:
    """Call only after the evaluation's row is committed."""
    _client(settings).send_task(EVALUATE_TASK, args=[evaluation_id], queue=settings.queue_name)


def send_committed(
    settings: Settings, enqueue: Callable[[Settings, int], None], *, noun: str, id_: int
) -> None:
    """Send a committed, queued row to the workers. The row is saved either way, so a broker that cannot be
    reached is a 503 the client retries with the same Idempotency-Key, which sends it again."""
    try:
        enqueue(settings, id_)
    except Exception as error:
        log.error("could not enqueue %s %s: %s", noun, id_, error)
        raise Unavailable(
            f"{noun.capitalize()} {id_} is saved but the broker is unreachable; retry the request with the "
            "same Idempotency-Key.",
            code="broker_unavailable",
            retry_after_s=5,
        ) from None
