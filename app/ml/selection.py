"""Which hold-out metric picks a job's best soft prompt (app/ml/versus_bare.py: whether it beats the bare
template).

The metric names are the contract's (app/contract/kinds.py). A job's metrics hold ``val_<metric>`` for the
tuned prompt and ``zero_shot_<metric>`` for the bare backbone with the same template (the loss is
``val_loss`` and ``zero_shot_val_loss``), and ``eval_metric``, the one that chose."""

from __future__ import annotations

from app.contract.kinds import EvalMetric

# The figures a generation hold-out is scored with when its outputs are decoded.
DECODED_METRICS = (
    EvalMetric.EXACT_MATCH,
    EvalMetric.F1,
    EvalMetric.BLEU,
    EvalMetric.CHRF,
    EvalMetric.ROUGE_L,
)


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
