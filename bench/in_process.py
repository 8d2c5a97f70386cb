"""The service's own code run in this process, as the API and a worker would run it, over a temporary SQLite
registry: uploads, jobs and evaluations for benchmarks that judge what a user of the service gets."""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import torch

from app.config import Settings
from app.contract.hyperparameters import Hyperparameters
from app.contract.kinds import Method
from app.db.migrate import upgrade
from app.db.models import Evaluation, TuningJob
from app.db.session import session_scope
from app.ml.backbone import Backbone
from app.ml.soft_prompt import stored_shape
from app.services.datasets.datasets import store_upload
from app.services.evaluation.evaluating import run_evaluation
from app.services.evaluation.evaluations import EvaluationRequest, create_evaluation
from app.services.registry.prompts import find_version
from app.services.serving.serving import decode_version
from app.services.tenancy.tenants import default_caller
from app.services.tuning.jobs import JobRequest, create_job
from app.services.tuning.training import run_job


class Registry:
    """A temporary registry and the default tenant; ``close()`` removes it."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self._folder = tempfile.TemporaryDirectory()
        folder = self._folder.name
        self.settings = Settings(database_url=f"sqlite:///{folder}/registry.db", data_dir=Path(folder))
        self.url = self.settings.registry_url
        upgrade(self.url)

    def close(self) -> None:
        self._folder.cleanup()

    def upload(self, records: list[dict], filename: str = "data.jsonl") -> int:
        payload = "\n".join(json.dumps(r) for r in records).encode()
        with session_scope(self.url) as session:
            dataset, _ = store_upload(
                session,
                caller=default_caller(session, settings=self.settings),
                settings=self.settings,
                stream=io.BytesIO(payload),
                filename=filename,
                name=None,
                count_tokens=None,
                idempotency_key=None,
            )
            return dataset.id

    def tune(self, *, task: str, dataset: int, template: str, **hyperparameters) -> dict:
        """A job with the defaults for everything but what is given, run here as a worker runs it: its
        outcome, resolved settings, metrics and wall time."""
        request = JobRequest(
            task=task,
            training_dataset=dataset,
            validation_dataset=None,
            base_model=None,
            num_virtual_tokens=None,
            template=template,
            init=None,
            hyperparameters=Hyperparameters(**hyperparameters),
        )
        with session_scope(self.url) as session:
            caller = default_caller(session, settings=self.settings)
            job, _ = create_job(
                session, caller=caller, request=request, settings=self.settings, idempotency_key=None
            )
            job_id = job.id
        started = time.perf_counter()
        outcome = run_job(db_url=self.url, job_id=job_id, backbone=self.backbone)
        seconds = time.perf_counter() - started
        with session_scope(self.url) as session:
            row = session.get(TuningJob, job_id)
            return {
                "outcome": outcome,
                "seconds": seconds,
                "method": row.method,
                "k": row.num_virtual_tokens,
                "hyperparameters": row.hyperparameters,
                "metrics": row.metrics,
                "version": row.result_version,
            }

    def evaluate(self, *, dataset: int, models: list[str | None], **options) -> dict:
        """An evaluation run here as a worker runs it: each model's metrics, the predictions, wall time."""
        request = EvaluationRequest(
            dataset=dataset,
            models=models,
            template=options.get("template"),
            max_new_tokens=options.get("max_new_tokens"),
        )
        with session_scope(self.url) as session:
            caller = default_caller(session, settings=self.settings)
            evaluation, _ = create_evaluation(
                session, caller=caller, request=request, settings=self.settings, idempotency_key=None
            )
            evaluation_id = evaluation.id
        started = time.perf_counter()
        outcome = run_evaluation(db_url=self.url, evaluation_id=evaluation_id, backbone=self.backbone)
        seconds = time.perf_counter() - started
        with session_scope(self.url) as session:
            row = session.get(Evaluation, evaluation_id)
            return {
                "outcome": outcome,
                "seconds": seconds,
                "results": {m.reference: m.metrics for m in row.models},
                "predictions": [json.loads(line) for line in (row.predictions or b"").decode().splitlines()],
            }

    def soft_prompt(self, ref: str) -> torch.Tensor:
        """A version's soft prompt (``task@3``) as serving decodes it."""
        with session_scope(self.url) as session:
            tenant_id = default_caller(session, settings=self.settings).tenant_id
            row = find_version(session, tenant_id=tenant_id, ref=ref)
            shape = stored_shape(self.backbone, Method(row.method))
            return decode_version(row, shape=shape, ref=ref, param="task")
