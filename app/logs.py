"""One JSON object per log line, the same in the API and the worker, carrying the ids of what the line is
about: the HTTP request, the job or evaluation, the task. Both processes call configure_logging() at start."""

from __future__ import annotations

import logging
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

# Set by the API for each request (app/api/request_id.py) and by the worker for each job or evaluation
# (workers/tasks.py).
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[int | None] = ContextVar("job_id", default=None)
evaluation_id: ContextVar[int | None] = ContextVar("evaluation_id", default=None)
task: ContextVar[str | None] = ContextVar("task", default=None)
# By the noun of the kind of run (app/services/runs/leases.py).
RUN_IDS = {"job": job_id, "evaluation": evaluation_id}

FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}


class _Ids(logging.Filter):
    """Puts the ids of the current request or job on every record, where there are any."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = (
            ("request_id", request_id),
            ("job_id", job_id),
            ("evaluation_id", evaluation_id),
            ("task", task),
        )
        for name, var in ids:
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


def json_formatter() -> JsonFormatter:
    return JsonFormatter(FIELDS, rename_fields=RENAMED, json_ensure_ascii=False)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(json_formatter())
    handler.addFilter(_Ids())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
