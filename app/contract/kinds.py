"""The kinds the service names, each defined once for every layer: tuning methods and how each may start,
dataset kinds, the statuses of runs on workers, and the hold-out metrics."""

from __future__ import annotations

from enum import StrEnum

from app.errors import InvalidRequest


class Method(StrEnum):
    """How a soft prompt is learned and what it is (app/ml/soft_prompt.py)."""

    PROMPT = "prompt"  # input embeddings in front of the input (Lester et al.)
    PREFIX = "prefix"  # keys and values in every layer (prefix tuning, P-tuning v2)


class InitStrategy(StrEnum):
    """How a job's soft prompt starts: from text (the given text, the task's label words, frequent
    vocabulary; a prefix from the keys and values those tokens leave), random, (a prefix only) zero, or as
    a version in the registry already is (transfer from another task, or more training of the same)."""

    TEXT = "text"
    LABELS = "labels"
    VOCAB = "vocab"
    RANDOM = "random"
    ZERO = "zero"
    VERSION = "version"


# The starts made from the backbone alone; a version's start is read from the registry.
PROMPT_INITS = (InitStrategy.TEXT, InitStrategy.LABELS, InitStrategy.VOCAB, InitStrategy.RANDOM)
INITS = {
    Method.PROMPT: (*PROMPT_INITS, InitStrategy.VERSION),
    Method.PREFIX: (*PROMPT_INITS, InitStrategy.ZERO, InitStrategy.VERSION),
}


class DatasetKind(StrEnum):
    """What a dataset's records hold, told from their fields (app/services/datasets/parsing.py)."""

    CLASSIFICATION = "classification"  # {"text", "label"}
    GENERATION = "generation"  # {"input", "output"} or {"prompt", "completion"}
    REFERENCES = "references"  # {"input", "references"}: to score generation against, not to train on


def check_init(
    method: Method, strategy: str, *, kind: DatasetKind, text: str | None, source: str | None = None
) -> InitStrategy:
    """The one check of a job's start, against its method and its dataset's kind: 422 naming the field.
    Whether ``source`` (task@version) exists and fits is the job service's to check (app/services/tuning)."""
    allowed = INITS[method]
    if strategy not in allowed:
        raise InvalidRequest(
            f"init.strategy must be one of {', '.join(allowed)} for method {method!r}; got {strategy!r}.",
            param="init.strategy",
        )
    if strategy == InitStrategy.TEXT and not (text or "").strip():
        raise InvalidRequest("init.strategy 'text' needs a non-empty init.text.", param="init.text")
    if strategy == InitStrategy.VERSION and not (source or "").strip():
        raise InvalidRequest(
            "init.strategy 'version' needs init.from, the version to start from (for example 'sst2@3').",
            param="init.from",
        )
    if strategy != InitStrategy.VERSION and source is not None:
        raise InvalidRequest("init.from goes with init.strategy 'version' only.", param="init.from")
    if strategy == InitStrategy.LABELS and kind != DatasetKind.CLASSIFICATION:
        raise InvalidRequest(
            "init.strategy 'labels' needs a classification dataset (records with 'text' and 'label').",
            param="init.strategy",
        )
    return InitStrategy(strategy)


def default_init(kind: DatasetKind) -> InitStrategy:
    """A job that names no start: its label words for classification, frequent vocabulary otherwise."""
    return InitStrategy.LABELS if kind == DatasetKind.CLASSIFICATION else InitStrategy.VOCAB


class JobStatus(StrEnum):
    """A tuning job's or an evaluation's status, as its row stores it (a string column: a new status needs
    no migration)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)  # work that may still run
FINISHED_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)  # work that never will
# Ids and version numbers are 32-bit INTEGER columns in PostgreSQL: the API refuses larger ones up front.
MAX_ID = 2**31 - 1


class EvalMetric(StrEnum):
    """The hold-out metrics a job may be chosen by (app/ml/selection.py) and an evaluation reports."""

    ACCURACY = "accuracy"
    MACRO_F1 = "macro_f1"
    LOSS = "loss"  # per target token; lower is better
    EXACT_MATCH = "exact_match"
    F1 = "f1"
    BLEU = "bleu"
    CHRF = "chrf"
    ROUGE_L = "rouge_l"


CLASSIFICATION_METRICS = (EvalMetric.ACCURACY, EvalMetric.MACRO_F1, EvalMetric.LOSS)
GENERATION_METRICS = (
    EvalMetric.ROUGE_L,
    EvalMetric.BLEU,
    EvalMetric.CHRF,
    EvalMetric.EXACT_MATCH,
    EvalMetric.F1,
    EvalMetric.LOSS,
)


def default_metric(*, classification: bool) -> EvalMetric:
    """Accuracy for classification. ROUGE-L for generation: it rewards a long data-to-text sentence and a
    short answer alike, where BLEU's 4-grams score most short answers 0 and exact match most long ones."""
    return EvalMetric.ACCURACY if classification else EvalMetric.ROUGE_L
