"""The worker process's Prometheus metrics (the process-wide registry: one worker per process), served on
Settings.worker_metrics_port by workers/tasks.py."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

JOBS = Counter(
    "softprompt_worker_jobs",
    "Job runs this worker ended, by outcome: succeeded, failed, cancelled, lost (taken over after a "
    "lapsed lease), handed_back (the worker stopped), yielded (its time slice ended with another tenant's "
    "run waiting), skipped (not queued when it arrived).",
    ["outcome"],
)
EVALUATIONS = Counter(
    "softprompt_worker_evaluations",
    "Evaluation runs this worker ended, by outcome (the job outcomes' names).",
    ["outcome"],
)
STEP_SECONDS = Histogram(
    "softprompt_worker_step_seconds",
    "Time of one training step.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)
