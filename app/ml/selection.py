"""Which hold-out metric picks a job's best soft prompt (app/ml/versus_bare.py: whether it beats the bare
template).

No torch here: the request schemas import the metric names. A job's metrics hold ``val_<metric>`` for the
tuned prompt and ``zero_shot_<metric>`` for the bare backbone with the same template (the loss is
``val_loss`` and ``zero_shot_val_loss``), and ``eval_metric``, the one that chose."""

from __future__ import annotations

from enum import StrEnum


class EvalMetric(StrEnum):
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
# The figures a generation hold-out is scored with when its outputs are decoded.
DECODED_METRICS = (
    EvalMetric.EXACT_MATCH,
    EvalMetric.F1,
    EvalMetric.BLEU,
    EvalMetric.CHRF,
    EvalMetric.ROUGE_L,
)


def default_metric(*, classification: bool) -> EvalMetric:
    """Accuracy for classification. ROUGE-L for generation: it rewards a long data-to-text sentence and a
    short answer alike, where BLEU's 4-grams score most short answers 0 and exact match most long ones."""
    return EvalMetric.ACCURACY if classification else EvalMetric.ROUGE_L


def tuned_key(metric: EvalMetric) -> str:
    return "val_loss" if metric is EvalMetric.LOSS else f"val_{metric.value}"


def bare_key(metric: EvalMetric) -> str:
    return "zero_shot_val_loss" if metric is EvalMetric.LOSS else f"zero_shot_{metric.value}"


def _higher_is_better(metric: EvalMetric, value: float) -> float:
    return -value if metric is EvalMetric.LOSS else value


def rank(metrics: dict, metric: EvalMetric) -> tuple[float, float]:
    """Higher is better: the chosen metric, then the loss to break ties. Figures that were not measured
    (a checkpoint written before the metric existed) rank last."""
    value = metrics.get(tuned_key(metric))
    score = float("-inf") if value is None else _higher_is_better(metric, value)
    return (score, -metrics["val_loss"])
