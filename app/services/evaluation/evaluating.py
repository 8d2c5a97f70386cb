"""Running one evaluation on a worker: claim it, score every model on the dataset through the engine's
batched decoding (or rank classification), and write every result in one transaction.

No result is written until the end, so a run that dies or loses its lease leaves no partial counts. A run
that gives its worker up (the worker shuts down, or its time slice ended with another tenant's run
waiting) saves the answers of the rows already scored, and the next attempt goes on from there; a run
whose worker died starts from those saved answers, or from the first row."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

import torch

from app.contract.kinds import DatasetKind, JobStatus, Method
from app.db.models import Dataset, Evaluation, PromptVersion, utcnow
from app.db.session import session_scope
from app.errors import DomainError, InvalidRequest
from app.ml.backbone import Backbone
from app.ml.generation_scores import example_scores, generation_report
from app.ml.inference import classify, generate
from app.ml.layout import context_ids, fit_context
from app.ml.scores import classification_report
from app.ml.soft_prompt import stored_shape, virtual_tokens
from app.ml.text import render
from app.services.datasets.parsing import Record, decode_records, outputs_of
from app.services.runs import leases
from app.services.runs.lifecycle import (
    HANDBACK,
    RunOutcome,
    RunOwner,
    RunWatch,
    requeue,
    retrying,
    run_leased,
)
from app.services.runs.turns import TimeSlice
from app.services.serving.serving import decode_version

log = logging.getLogger(__name__)

# Rows decoded (or scored) in one batch of the engine's scheduler, by default (the worker passes the
# setting `evaluation_batch_rows`); between batches the run writes its progress and looks for a cancel.
CHUNK_ROWS = 64


@dataclass
class _Model:
    reference: str | None  # "task@3", or None: the bare backbone
    prompt: torch.Tensor | None
    template: str
    labels: list[str] | None  # classification: the labels it ranks


@dataclass
class _Inputs:
    tenant_id: int
    kind: str
    max_new_tokens: int
    records: list[Record]
    models: list[_Model]
    answers: list[list]  # saved by an earlier attempt: per model, the answers of its first rows


def run_evaluation(
    *,
    db_url: str,
    evaluation_id: int,
    backbone: Backbone,
    lease_s: float = 60.0,
    chunk_rows: int = CHUNK_ROWS,
    time_slice_s: float = 0.0,
) -> RunOutcome:
    """Runs the evaluation if this call wins the claim; returns how the run ended. After ``time_slice_s``
    (0: never) it yields its worker to another tenant's waiting run (app/services/runs/turns.py)."""

    def body(owner: RunOwner, lost: threading.Event) -> RunOutcome:
        inputs = retrying(lambda: _load(db_url, evaluation_id, backbone))
        turn = TimeSlice(db_url=db_url, tenant_id=inputs.tenant_id, seconds=time_slice_s)
        watch = RunWatch(owner, lost=lost, turn=turn)
        outputs, finished = _predict(backbone, inputs, watch=watch, chunk_rows=chunk_rows)
        if not finished:
            return retrying(lambda: owner.end(lambda _, row: _stopped(row, outputs, yielded=turn.yielded)))
        results, lines = _score(inputs, outputs)
        return retrying(lambda: owner.end(lambda _, row: _succeeded(row, results, lines)))

    return run_leased(
        leases.EVALUATIONS,
        db_url=db_url,
        row_id=evaluation_id,
        lease_s=lease_s,
        body=body,
        error_code="evaluation_error",
    )


def _load(db_url: str, evaluation_id: int, backbone: Backbone) -> _Inputs:
    with session_scope(db_url) as session:
        evaluation = session.get(Evaluation, evaluation_id)
        dataset = session.get(Dataset, evaluation.dataset_id) if evaluation.dataset_id else None
        if dataset is None:
            raise DomainError("The evaluation's dataset was deleted.", code="dataset_missing")
        models = [_model(session, m, evaluation, dataset, backbone) for m in evaluation.models]
        saved = evaluation.partial_answers
        return _Inputs(
            tenant_id=evaluation.tenant_id,
            kind=evaluation.kind,
            max_new_tokens=evaluation.max_new_tokens,
            records=decode_records(dataset.records),
            models=models,
            answers=json.loads(saved) if saved else [],
        )


def _model(session, entry, evaluation: Evaluation, dataset: Dataset, backbone: Backbone) -> _Model:
    if entry.reference is None:
        return _Model(None, None, evaluation.template, dataset.labels)
    version = session.get(PromptVersion, entry.version_id) if entry.version_id else None
    if version is None:
        raise DomainError(
            f"Version {entry.reference} was deleted before it was scored.", code="version_missing"
        )
    shape = stored_shape(backbone, Method(version.method))
    prompt = decode_version(version, shape=shape, ref=entry.reference, param="models")
    return _Model(entry.reference, prompt, version.template, version.labels)


def _predict(
    backbone: Backbone, inputs: _Inputs, *, watch: RunWatch, chunk_rows: int
) -> tuple[list[list], bool]:
    """Each model's output for every row (a label, or a generated text), going on from the answers an
    earlier attempt saved, and True; or the answers so far and False if the run must stop."""
    rows, total = len(inputs.records), len(inputs.records) * len(inputs.models)
    outputs: list[list] = [list(saved) for saved in inputs.answers]
    _progress(watch, sum(map(len, outputs)), total)  # an attempt after a lost one says where it starts
    for index, model in enumerate(inputs.models):
        if index == len(outputs):
            outputs.append([])
        answers = outputs[index]
        for start in range(len(answers), rows, chunk_rows):
            if watch.should_stop():
                return outputs, False
            chunk = inputs.records[start : start + chunk_rows]
            texts = [render(model.template, source) for source, _ in chunk]
            answers += _answer(backbone, model, texts, inputs, first_row=start)
            _progress(watch, index * rows + len(answers), total)
    return outputs, True


def _answer(backbone: Backbone, model: _Model, texts: list[str], inputs: _Inputs, *, first_row: int) -> list:
    prompts = [model.prompt] * len(texts)
    try:
        if inputs.kind == DatasetKind.CLASSIFICATION:
            scored = classify(backbone, labels=model.labels, prompts=prompts, texts=texts)
            return [max(row, key=row.get) for row in scored]
        options = {"max_new_tokens": inputs.max_new_tokens, "temperature": 0.0}
        return [g.text.strip() for g in generate(backbone, prompts=prompts, texts=texts, **options)]
    except InvalidRequest:
        reserved = virtual_tokens(model.prompt) + inputs.max_new_tokens
        for offset, text in enumerate(texts):
            try:
                fit_context(backbone, context_ids(backbone, text), reserved, truncate=False)
            except InvalidRequest as error:
                row = first_row + offset + 1
                raise InvalidRequest(
                    f"Row {row} does not fit the backbone's window: {error.message}.",
                    param="dataset",
                    line=row,
                ) from None
        raise


def _score(inputs: _Inputs, outputs: list[list]) -> tuple[list[dict], bytes]:
    """Each model's metrics, and the predictions file: one JSON line per row."""
    expected = [record[1] for record in inputs.records]
    if inputs.kind == DatasetKind.CLASSIFICATION:
        results = [
            classification_report(expected, answers, labels=model.labels)
            for model, answers in zip(inputs.models, outputs, strict=True)
        ]
        per_row = [
            [{"correct": answer == gold} for answer, gold in zip(a, expected, strict=True)] for a in outputs
        ]
    else:
        references = [outputs_of(record) for record in inputs.records]
        results = [generation_report(answers, references) for answers in outputs]
        per_row = [
            [example_scores(answer, refs) for answer, refs in zip(a, references, strict=True)]
            for a in outputs
        ]
    lines = []
    for index, (source, gold) in enumerate(inputs.records):
        predictions = [
            {"model": model.reference, "output": answers[index], **scores[index]}
            for model, answers, scores in zip(inputs.models, outputs, per_row, strict=True)
        ]
        lines.append(
            json.dumps({"row": index + 1, "input": source, "expected": gold, "predictions": predictions})
        )
    return results, "\n".join(lines).encode()


def _progress(watch: RunWatch, done: int, total: int) -> None:
    if watch.progress_due(last=done >= total):
        watch.write(lambda _, row: setattr(row, "progress", {"done": done, "total": total}))


def _succeeded(row: Evaluation, results: list[dict], predictions: bytes) -> RunOutcome:
    """Every model's metrics and the predictions, in the owner's transaction (cancelled if asked)."""
    if row.cancel_requested:
        return _cancelled(row)
    for model, metrics in zip(row.models, results, strict=True):
        model.metrics = metrics
    row.predictions, row.status, row.finished_at = predictions, JobStatus.SUCCEEDED, utcnow()
    row.partial_answers = None
    row.progress = {**row.progress, "done": row.progress.get("total", 0)}
    return RunOutcome.SUCCEEDED


def _stopped(row: Evaluation, answers: list[list], *, yielded: bool) -> RunOutcome:
    """Cancelled by its owner, or back to the queue with the answers so far, not counted as an attempt,
    because this worker is shutting down or the run ``yielded`` its turn."""
    if (HANDBACK.is_set() or yielded) and not row.cancel_requested:
        row.partial_answers = json.dumps(answers).encode()
        return requeue(row, yielded=not HANDBACK.is_set())
    return _cancelled(row)


def _cancelled(row: Evaluation) -> RunOutcome:
    row.status, row.finished_at, row.partial_answers = JobStatus.CANCELLED, utcnow(), None
    return RunOutcome.CANCELLED
